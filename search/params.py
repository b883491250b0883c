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
    "sce": ("select_topk",),
    "ramplus_tl": ("r", "alpha"),
    "nearswap": ("t",),
}
# The searched params some method takes per expert (a `PerModel` parameter; a test checks this
# against the method registry, which this torch-free module cannot import).
PER_EXPERT_PARAMS = ("density", "epsilon", "gamma")
WEIGHT = "weight"  # each expert's mixing weight, searched for every method that weights experts
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    WEIGHT: (0.0, 1.0),
    "lambda": (0.2, 1.5),
    "density": (0.1, 1.0),
    "t": (0.0, 1.0),
    "gamma": (0.0, 0.1),
    "epsilon": (0.0, 0.2),
    "power": (0.25, 2.0),
    "select_topk": (0.1, 1.0),
    # method-qualified ranges win over the plain ones (nearswap's t is in weight units, not [0, 1])
    "nearswap.t": (0.0, 0.01),
    "ramplus_tl.r": (0.0, 0.5),
    "ramplus_tl.alpha": (0.0, 1.0),
}


def split_qualified(name: str) -> tuple[str | None, str]:
    """`method.param` → (method, param); a plain `param` → (None, param)."""
    method, dot, param = name.rpartition(".")
    return (method, param) if dot else (None, name)


def searched_names(qualified: bool = False) -> list[str]:
    """Every name `search.shared` may use: `weight` and the searched method params; with `qualified`
    (`search.ranges`) also `method.param`, one method's param, whose range wins over the plain one."""
    plain = sorted({p for params in SEARCHED_PARAMS.values() for p in params})
    if not qualified:
        return [WEIGHT, *plain]
    return [WEIGHT, *plain, *sorted(f"{method}.{p}" for method, params in SEARCHED_PARAMS.items() for p in params)]


def methods_searching(name: str) -> list[str]:
    """The methods whose searched params include `name` (a plain param, or `method.param`)."""
    method, param = split_qualified(name)
    return [m for m, params in SEARCHED_PARAMS.items() if param in params and method in (None, m)]
