"""The values merge-method parameters and expert weights may take, checked before any tensor is read.

Plain Python (no torch), so the study config checks its search ranges against the same
domains the recipe validator uses. A parameter without an entry only has to be a finite
number. Values are checked one by one (`scalar_values`), so a per-expert mapping or a list of
values (one per layer) is checked entry by entry.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import UnionType
from typing import Literal, Union, get_args, get_origin


@dataclass(frozen=True)
class Domain:
    """An interval of finite numbers; `low_open`/`high_open` exclude the ends."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        try:
            value = float(value)
        except OverflowError:  # an int beyond float range
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "a finite number"
        low = "-inf" if self.low == -math.inf else f"{self.low:g}"
        high = "inf" if self.high == math.inf else f"{self.high:g}"
        left = "(" if self.low_open or self.low == -math.inf else "["
        right = ")" if self.high_open or self.high == math.inf else "]"
        return f"{left}{low}, {high}{right}"


FINITE = Domain()
FRACTION = Domain(0.0, 1.0)
# By public parameter name; `METHOD_DOMAINS` overrides one method's parameter.
PARAM_DOMAINS: dict[str, Domain] = {
    "density": Domain(0.0, 1.0, low_open=True),  # the fraction kept: 0 would keep nothing, i.e. return the base
    "gamma": FRACTION,
    "t": FRACTION,
    "epsilon": Domain(0.0),
    "power": Domain(0.0, low_open=True),
    "reduce_non_diagonal_ratio": FRACTION,
}
METHOD_DOMAINS: dict[tuple[str, str], Domain] = {
    ("della", "epsilon"): FRACTION,
    ("della_linear", "epsilon"): FRACTION,
    ("sce", "select_topk"): Domain(0.0, 1.0, low_open=True),  # the fraction of positions kept
    ("nearswap", "t"): Domain(0.0),  # a distance threshold in weight units, not a fraction
    ("ramplus_tl", "r"): FRACTION,
    ("ramplus_tl", "alpha"): FRACTION,
    ("karcher", "tol"): Domain(0.0, low_open=True),
    ("multislerp", "eps"): Domain(0.0, low_open=True),
}
# Weights scale each expert's curvature / Fisher in these methods, so they cannot be negative.
WEIGHT_DOMAINS: dict[str, Domain] = {"ota": Domain(0.0), "fisher": Domain(0.0)}

# Methods whose result does not depend on per-expert weights.
UNWEIGHTED_METHODS = frozenset(
    {"slerp", "model_stock", "passthrough", "m3", "sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion"}
)
# What all-zero weights would do (the rest, task-vector methods, would return the base).
_ZERO_WEIGHT_EFFECTS = {"linear": "write an all-zero model", "regmean": "write an all-zero model", "fisher": "divide 0 by 0"}


def param_domain(method: str, param: str) -> Domain:
    return METHOD_DOMAINS.get((method, param), PARAM_DOMAINS.get(param, FINITE))


def weight_domain(method: str) -> Domain:
    return WEIGHT_DOMAINS.get(method, FINITE)


def scalar_values(value: object) -> Iterator[object]:
    """Every single value a parameter setting holds: itself, or each entry of a mapping / list (nested)."""
    if isinstance(value, Mapping):
        for item in value.values():
            yield from scalar_values(item)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        for item in value:
            yield from scalar_values(item)
    else:
        yield value


def value_problem(method: str, param: str, annotation: object, value: object) -> str | None:
    """Why one value of `method`'s parameter `param` (typed `annotation` in its signature) is refused, or None."""
    choices = literal_choices(annotation)
    if choices is not None:
        return choice_problem(choices, value)
    if annotation is bool:
        return None if isinstance(value, bool) else f"{value!r} is not true/false"
    if not _numeric(annotation):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{value!r} is not a number"
    domain = param_domain(method, param)
    if value not in domain:
        return f"{value} is outside {domain}" if value in FINITE else f"{value} is not a finite number"
    return None


def weights_problem(method: str, weights: Sequence[float]) -> str | None:
    """Why a rule's per-expert weights are refused for `method` (values already finite), or None."""
    if method in UNWEIGHTED_METHODS:
        return None
    domain = weight_domain(method)
    bad = next((w for w in weights if w not in domain), None)
    if bad is not None:
        return f"{bad} is outside {domain} for '{method}' (weights scale each expert's statistics)"
    if weights and not any(weights):
        effect = _ZERO_WEIGHT_EFFECTS.get(method, "return the base model unchanged")
        return f"every expert's weight is 0, so '{method}' would {effect}; give at least one expert a non-zero weight"
    return None


def literal_choices(annotation: object) -> tuple[object, ...] | None:
    """The allowed values of a `Literal[...]` (or `bool | Literal[...]`) parameter; None for other types."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (Union, UnionType):
        parts = get_args(annotation)
        if all(p is bool or get_origin(p) is Literal for p in parts):
            return tuple(c for p in parts for c in ((True, False) if p is bool else get_args(p)))
    return None


def choice_problem(choices: tuple[object, ...], value: object) -> str | None:
    """Why `value` is none of `choices` (exactly: True is not 1), or None."""
    if any(type(value) is type(c) and value == c for c in choices):
        return None
    allowed = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
    return f"{value!r} is not one of {allowed}"


def _numeric(annotation: object) -> bool:
    """float, int or a per-expert float (`PerModel`: float | Sequence[float])."""
    if annotation in (float, int):
        return True
    return get_origin(annotation) is Union and float in get_args(annotation)


def rule_problem(method: str, params: Mapping[str, object], weights: Sequence[float], annotations: Mapping[str, object]) -> str | None:
    """The first refused value of one recipe rule as `params.NAME: why` / `weights: why`, or None.

    `annotations`: the method's public parameter name → its annotation; unknown names are the caller's check.
    """
    for name, setting in params.items():
        if name not in annotations:
            continue
        for value in scalar_values(setting):
            problem = value_problem(method, name, annotations[name], value)
            if problem is not None:
                return f"params.{name}: {problem}"
    problem = weights_problem(method, weights)
    return None if problem is None else f"weights: {problem}"
