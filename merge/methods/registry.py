"""The registry of merge methods and the inputs every method receives for one tensor.

A method is a pure function `fn(x: TensorInputs, *, param=default, ...) -> Tensor` over
float32 tensors. Its keyword-only parameters, with their annotations and defaults, *are*
its parameter schema: the recipe validator and the search space read them from here.
A parameter annotated `PerModel` accepts one value for all experts or one per expert.
A trailing underscore is dropped from the public name (`lambda_` is `lambda` in recipes).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Union, get_args, get_origin, get_type_hints

import torch
from torch import Tensor

from mergetune.core.errors import ConfigError
from mergetune.merge.domains import choice_problem, literal_choices
from mergetune.merge.sparsify import GlobalCut, TensorCut

PerModel = Union[float, Sequence[float]]
"""Annotation for a parameter that may differ per expert (a scalar applies to all)."""

AUX_KINDS = ("moments", "fisher", "gram")


def tensor_generator(seed: int, tensor_name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name): same recipe + seed → same bytes anywhere."""
    digest = hashlib.blake2b(f"{seed}\x00{tensor_name}".encode(), digest_size=8).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


GlobalCuts = Callable[[str, int, float], GlobalCut]
"""(kind, expert index, keep fraction) → the expert's global cut (exactly ⌊ρ·N⌋ entries over all
its tensors; see `sparsify.GlobalCut`); kind is "magnitude" (|τ|) or "saliency" (v·τ²).
Supplied by the engine, which computes it once per (expert, density) over the whole expert."""


@dataclass
class TensorInputs:
    """Everything a method may read for one tensor. All tensors are float32, same shape.

    Give `models` (θ_k) or `deltas` (τ_k = θ_k − θ₀); the other form is derived on first use
    and cached, so methods simply read whichever they need.
    """

    name: str
    base: Tensor | None
    weights: list[float]
    models_given: list[Tensor] | None = None
    deltas_given: list[Tensor] | None = None
    moments: list[Tensor] | None = None  # Adam exp_avg_sq per expert (full form)
    fisher: list[Tensor] | None = None  # diagonal Fisher per expert
    gram: list[Tensor] | None = None  # per expert X^T X of this linear layer's inputs (in × in)
    generator: torch.Generator = field(default_factory=lambda: tensor_generator(0, ""))
    global_cut: GlobalCuts | None = None
    seed: int | None = None  # the merge's seed, for draws shared by all its tensors (M³'s weights)

    def __post_init__(self) -> None:
        if (self.models_given is None) == (self.deltas_given is None):
            raise ValueError("give exactly one of models_given / deltas_given")
        if self.deltas_given is not None and self.base is None:
            raise ValueError("deltas need a base tensor")
        if len(self.weights) != self.num_models:
            raise ValueError(f"{len(self.weights)} weights for {self.num_models} models")

    @property
    def num_models(self) -> int:
        given = self.models_given if self.models_given is not None else self.deltas_given
        return len(given)

    @cached_property
    def models(self) -> list[Tensor]:
        if self.models_given is not None:
            return self.models_given
        return [self.base + d for d in self.deltas_given]

    @cached_property
    def deltas(self) -> list[Tensor]:
        if self.deltas_given is not None:
            return self.deltas_given
        if self.base is None:
            raise ValueError(f"{self.name}: this method needs a base model")
        return [m - self.base for m in self.models_given]

    def cut(self, kind: str, model: int, density: float) -> TensorCut:
        """The keep-mask function of this tensor's scores under expert `model`'s global cut."""
        if self.global_cut is None:
            raise ValueError(f"{self.name}: global scope needs the expert's global cut from the merge engine")
        cut = self.global_cut(kind, model, density)
        return lambda scores: cut.mask(self.name, scores)


@dataclass(frozen=True)
class ParamSpec:
    name: str  # public name (in recipes)
    arg: str  # Python keyword
    default: object
    annotation: object
    per_model: bool


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., Tensor]
    needs_base: bool
    min_models: int
    max_models: int | None
    needs: frozenset[str]  # subset of AUX_KINDS; "moments_or_fisher" is spelled as both in `any_of`
    any_of: frozenset[str]  # at least one of these aux kinds must be given
    random: bool
    params: dict[str, ParamSpec]
    summary: str

    def bind(self, params: dict[str, object], num_models: int) -> dict[str, object]:
        """Public params → keyword args: unknown names rejected, per-model lists length-checked."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "(none)"
            raise ConfigError(f"method '{self.name}' has no parameter {unknown[0]!r}; allowed: {allowed}")
        kwargs = {}
        for name, value in params.items():
            spec = self.params[name]
            if isinstance(value, (list, tuple)):
                if not spec.per_model:
                    raise ConfigError(f"method '{self.name}': parameter {name!r} takes one value, not a list")
                if len(value) != num_models:
                    raise ConfigError(
                        f"method '{self.name}': parameter {name!r} has {len(value)} values for {num_models} models"
                    )
            choices = literal_choices(spec.annotation)
            problem = None if choices is None else choice_problem(choices, value)
            if problem is not None:
                raise ConfigError(f"method '{self.name}': {name}: {problem}")
            kwargs[spec.arg] = value
        return kwargs

    def __call__(self, x: TensorInputs, **params: object) -> Tensor:
        return self.fn(x, **self.bind(params, x.num_models))


_REGISTRY: dict[str, MethodSpec] = {}


def _is_per_model(annotation: object) -> bool:
    if annotation is PerModel:
        return True
    return get_origin(annotation) is Union and Sequence[float] in get_args(annotation)


def register(
    name: str,
    *,
    needs_base: bool = True,
    min_models: int = 1,
    max_models: int | None = None,
    needs: Sequence[str] = (),
    any_of: Sequence[str] = (),
    random: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register `fn` under `name`; its keyword-only parameters become the method's schema."""

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        hints = get_type_hints(fn)
        params = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{name}: parameter {p.name} needs a default")
            public = p.name.rstrip("_")
            annotation = hints.get(p.name, object)
            params[public] = ParamSpec(public, p.name, p.default, annotation, _is_per_model(annotation))
        for kind in (*needs, *any_of):
            if kind not in AUX_KINDS:
                raise ValueError(f"{name}: unknown aux kind {kind!r}")
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[name] = MethodSpec(
            name, fn, needs_base, min_models, max_models, frozenset(needs), frozenset(any_of), random, params, summary
        )
        return fn

    return decorate


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def per_model(value: PerModel, num_models: int) -> list[float]:
    """Broadcast a scalar-or-list parameter to one float per expert."""
    if isinstance(value, (int, float)):
        return [float(value)] * num_models
    return [float(v) for v in value]
