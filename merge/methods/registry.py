"""The registry of merge methods and the inputs every method receives for one tensor (or a slice of one).

A method is a pure function `fn(x: TensorInputs, *, param=default, ...) -> Tensor` over
float32 tensors. Its keyword-only parameters, with their annotations and defaults, *are*
its parameter schema: the recipe validator and the search space read them from here.
A parameter annotated `PerModel` accepts one value for all experts or one per expert.
A trailing underscore is dropped from the public name (`lambda_` is `lambda` in recipes).

A `sliceable` method is elementwise given per-tensor facts it reads from `TensorInputs` (order
statistics, counter-based draws, global cuts, whole-tensor sums): the engines may call it on
matching slices of the flattened inputs (`offset`, `full_shape`) and concatenate the results,
which are the bytes of one call on the whole tensor. A method declaring `totals` may need sums
over the whole tensor first: called with `totals_pass` it returns its float64 partial sums for
the slice (empty when it needs none), and the engine hands their sum back as `totals`.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, Union, get_args, get_origin, get_type_hints

import torch
from torch import Tensor

from mergetune.core.errors import ConfigError
from mergetune.merge.domains import choice_problem, literal_choices
from mergetune.merge.kernels import EAGER, Kernels
from mergetune.merge.order_stats import TensorOrder, row_ranks
from mergetune.merge.sort_positions import SortPositions
from mergetune.merge.sparsify import GlobalCut, scores_of

PerModel = Union[float, Sequence[float]]
"""Annotation for a parameter that may differ per expert (a scalar applies to all)."""

AUX_KINDS = ("moments", "fisher", "gram")
ORDER_KINDS = ("magnitude.desc", "magnitude.asc", "saliency.desc", "row_ranks")
"""Per-tensor order statistics a method may read: |τ| or v·τ² sorted one way (`TensorOrder`), |τ| ranks per row."""


def tensor_generator(seed: int, tensor_name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name), for draws made once per merge (M³'s weights)."""
    digest = hashlib.blake2b(f"{seed}\x00{tensor_name}".encode(), digest_size=8).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


GlobalCuts = Callable[[str, int, float], GlobalCut]
"""(kind, expert index, keep fraction) → the expert's global cut (exactly ⌊ρ·N⌋ entries over all
its tensors; see `sparsify.GlobalCut`); kind is "magnitude" (|τ|) or "saliency" (v·τ²).
Supplied by the engine, which computes it once per (expert, density) over the whole expert."""


class TensorSummaries(Protocol):
    """A tensor's order statistics per expert (index in the rule), computed once per study by the engine."""

    def order(self, kind: str, model: int, direction: str) -> TensorOrder | SortPositions: ...

    def row_ranks(self, model: int) -> Tensor: ...

    def task_vector_l1(self, model: int, start: int, stop: int) -> Tensor | None:
        """Σ|τ| of expert `model` over flat entries [start, stop) as a method's kernel summed it (float64, 0-dim), if
        a merge has; a merge's rescale reads it instead of summing again (it never changes within a study)."""
        ...

    def keep_task_vector_l1(self, model: int, start: int, stop: int, total: Tensor) -> None: ...


class SliceNorms:
    """`TensorSummaries.task_vector_l1` kept by (expert, start, stop): 8 bytes a slice and expert."""

    def __init__(self) -> None:
        self._sums: dict[tuple[object, int, int], Tensor] = {}

    def task_vector_l1(self, expert: object, start: int, stop: int) -> Tensor | None:
        return self._sums.get((expert, start, stop))

    def keep_task_vector_l1(self, expert: object, start: int, stop: int, total: Tensor) -> None:
        self._sums[(expert, start, stop)] = total

    def __len__(self) -> int:
        return len(self._sums)


class InputSummaries(SliceNorms):
    """Order statistics from a whole tensor's own task vectors (and moments), on first use, for a merge that
    selects once per tensor (the disk engine; a method called on a whole tensor): each (kind, expert)'s scores
    as `SortPositions`, which finds a selection's entries in `torch.sort` order without sorting.

    `deltas` are the float32 τ_k of the whole tensor, or a function making them when first needed."""

    def __init__(self, deltas: list[Tensor] | Callable[[], list[Tensor]], moments: list[Tensor] | None) -> None:
        super().__init__()
        self._given, self._moments = deltas, moments
        self._orders: dict[tuple[str, int], SortPositions] = {}
        self._ranks: dict[int, Tensor] = {}

    @cached_property
    def _deltas(self) -> list[Tensor]:
        return self._given() if callable(self._given) else self._given

    def order(self, kind: str, model: int, direction: str) -> SortPositions:
        if (kind, model) not in self._orders:
            moments = self._moments[model] if self._moments else None
            self._orders[(kind, model)] = SortPositions(scores_of(kind, self._deltas[model], moments))
        return self._orders[(kind, model)]

    def row_ranks(self, model: int) -> Tensor:
        if model not in self._ranks:
            self._ranks[model] = row_ranks(self._deltas[model])
        return self._ranks[model]


@dataclass
class StoredSlice:
    """A slice's inputs as stored (any float dtype, flat): the base θ₀ (None without one) and the models θ_k."""

    base: Tensor | None
    models: list[Tensor]


class TensorInputs:
    """Everything a method may read for one tensor, or for elements [offset, offset + n) of its flattened
    entries (`full_shape` given; the inputs are then flat slices). All tensors are float32, same shape.

    Give `models_given` (θ_k) or `deltas_given` (τ_k = θ_k − θ₀); the other form is derived on first use
    and cached, so methods simply read whichever they need. A slice may instead come `stored`: the base
    and models as stored, which sliceable methods read in fused kernels (`kernels`); `base`, `models` and
    `deltas` (float32, τ_k = float32(θ_k) − float32(θ₀)) are then made only if a method asks for them.
    """

    def __init__(
        self,
        *,
        name: str,
        weights: list[float],
        base: Tensor | None = None,
        models_given: list[Tensor] | None = None,
        deltas_given: list[Tensor] | None = None,
        stored: StoredSlice | None = None,
        moments: list[Tensor] | None = None,  # Adam exp_avg_sq per expert (full form)
        fisher: list[Tensor] | None = None,  # diagonal Fisher per expert
        gram: list[Tensor] | None = None,  # per expert X^T X of this linear layer's inputs (in × in)
        global_cut: GlobalCuts | None = None,
        seed: int | None = None,  # the merge's seed: keys the counter-based draws (DARE, DELLA) and M³'s weights
        offset: int = 0,  # the slice's first element in the flattened tensor
        full_shape: tuple[int, ...] | None = None,  # the whole tensor's shape when the inputs are a slice of it
        summaries: TensorSummaries | None = None,  # the engine's precomputed order statistics (else: from the inputs)
        totals: Tensor | None = None,  # the method's sums over the whole tensor (its `totals_pass` results, summed)
        totals_pass: bool = False,  # return the slice's partial sums instead of merging
        memo: dict | None = None,  # facts derived once per tensor, shared by its slices
        kernels: Kernels = EAGER,  # how the sliceable methods' elementwise steps run (eager, or compiled)
        out: Tensor | None = None,  # a slice's destination (flat, any float dtype): a sliceable method's kernel writes there
        scratch: Callable[[object], Tensor] | None = None,  # the engine's reusable flat float32 buffers by role, a slice each
    ) -> None:
        given = [g for g in (models_given, deltas_given, stored) if g is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of models_given / deltas_given / stored")
        if deltas_given is not None and base is None:
            raise ValueError("deltas need a base tensor")
        if stored is not None and base is not None:
            raise ValueError("stored inputs carry their own base")
        self.name, self.weights, self._base = name, weights, base
        self.models_given, self.deltas_given, self.stored = models_given, deltas_given, stored
        self.moments, self.fisher, self.gram = moments, fisher, gram
        self.global_cut, self.seed = global_cut, seed
        self.offset, self.full_shape, self.summaries = offset, full_shape, summaries
        self.totals, self.totals_pass = totals, totals_pass
        self.memo = {} if memo is None else memo
        self.kernels, self.out, self.scratch = kernels, out, scratch
        if len(self.weights) != self.num_models:
            raise ValueError(f"{len(self.weights)} weights for {self.num_models} models")

    def __repr__(self) -> str:
        return f"TensorInputs({self.name!r}, {self.num_models} models, offset {self.offset}, shape {self.shape})"

    @property
    def base(self) -> Tensor | None:
        if self._base is None and self.stored is not None and self.stored.base is not None:
            self._base = self.stored.base.to(torch.float32)
        return self._base

    @property
    def has_base(self) -> bool:
        return self._base is not None or (self.stored is not None and self.stored.base is not None)

    def _given(self) -> list[Tensor]:
        if self.stored is not None:
            return self.stored.models
        return self.models_given if self.models_given is not None else self.deltas_given

    @property
    def num_models(self) -> int:
        return len(self._given())

    @property
    def is_slice(self) -> bool:
        return self.full_shape is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole tensor's shape."""
        if self.full_shape is not None:
            return tuple(self.full_shape)
        return tuple(self._given()[0].shape)

    @property
    def numel(self) -> int:
        """Entries of the whole tensor."""
        return math.prod(self.shape)

    @cached_property
    def models(self) -> list[Tensor]:
        if self.stored is not None:
            return [m.to(torch.float32) for m in self.stored.models]
        if self.models_given is not None:
            return self.models_given
        return [self.base + d for d in self.deltas_given]

    @cached_property
    def deltas(self) -> list[Tensor]:
        if self.deltas_given is not None:
            return self.deltas_given
        if self.base is None:
            raise ValueError(f"{self.name}: this method needs a base model")
        return [m - self.base for m in self.models]

    def _summaries(self) -> TensorSummaries:
        if self.summaries is not None:
            return self.summaries
        if self.is_slice:
            raise ValueError(f"{self.name}: a slice needs the engine's order statistics (TensorInputs.summaries)")
        if "summaries" not in self.memo:
            self.memo["summaries"] = InputSummaries(self.deltas, self.moments)
        return self.memo["summaries"]

    def order(self, kind: str, model: int, direction: str) -> TensorOrder | SortPositions:
        """Expert `model`'s scores of `kind` ("magnitude" |τ|, "saliency" v·τ²) on this tensor, in sort order."""
        return self._summaries().order(kind, model, direction)

    def row_ranks(self, model: int) -> Tensor:
        """Expert `model`'s |τ| rank of every entry within its row, over the whole tensor (`order_stats.row_ranks`)."""
        return self._summaries().row_ranks(model)

    def cut(self, kind: str, model: int, density: float) -> GlobalCut:
        """Expert `model`'s global cut keeping `density` of its scores of `kind` over all its tensors."""
        if self.global_cut is None:
            raise ValueError(f"{self.name}: global scope needs the expert's global cut from the merge engine")
        return self.global_cut(kind, model, density)


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
    sliceable: bool = False  # elementwise given per-tensor facts: may run over slices (see the module docstring)
    totals: bool = False  # may need sums over the whole tensor before its slices (`totals_pass`)
    orders: tuple[str, ...] = ()  # the order statistics (ORDER_KINDS) it may read

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
    sliceable: bool = False,
    totals: bool = False,
    orders: Sequence[str] = (),
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
        for kind in orders:
            if kind not in ORDER_KINDS:
                raise ValueError(f"{name}: unknown order statistic {kind!r}")
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[name] = MethodSpec(
            name, fn, needs_base, min_models, max_models, frozenset(needs), frozenset(any_of), random, params, summary,
            sliceable, totals, tuple(orders),
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
