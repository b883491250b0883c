"""The searched method parameters: which ones the search tunes, on which default ranges (no torch, for the config).

A range must lie inside the parameter's domain (merge/domains.py), the one recipes are checked against.
"""

from __future__ import annotations

# Which method params the search tunes by default; the rest keep the method's default
# (e.g. OTA's ε = 1e-30 must never be searched on a [0, 0.2] range).
SEARCHED_PARAMS: dict[str, tuple[str, ...]] = {
    "task_arithmetic": ("lambda",),
    "ties": ("density", "lambda"),
    "dare_ties": ("density", "lambda"),
    "dare_linear": ("density", "lambda"),
    "della": ("density", "epsilon", "lambda"),
    "della_linear": ("density", "epsilon", "lambda"),
    "breadcrumbs": ("density", "gamma", "lambda"),
    "breadcrumbs_ties": ("density", "gamma", "lambda"),
    "slerp": ("t",),
    "ota": ("density", "power"),
}
WEIGHT = "weight"  # each expert's mixing weight, searched for every method that weights experts
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    WEIGHT: (0.0, 1.0),
    "lambda": (0.2, 1.5),
    "density": (0.1, 1.0),
    "t": (0.0, 1.0),
    "gamma": (0.0, 0.1),
    "epsilon": (0.0, 0.2),
    "power": (0.25, 2.0),
}


def searched_names() -> list[str]:
    """Every name `search.ranges` / `search.shared` may use: `weight` and the searched method params."""
    return [WEIGHT, *sorted({p for params in SEARCHED_PARAMS.values() for p in params})]


def methods_searching(param: str) -> list[str]:
    """The methods whose searched params include `param`."""
    return [method for method, params in SEARCHED_PARAMS.items() if param in params]
