"""The per-tensor rule plan: which recipe rule merges each tensor, and running one rule on one tensor.

Both merge engines (disk to disk in `engine.py`, the search worker's `resident.py`) call
the same functions here with the same float32 inputs — the base θ₀ and, for methods over
task vectors, τ_k = θ_k − θ₀ made in float32 from the stored tensors, else the models θ_k —
so a trial and its export are bit-identical. Sliceable methods (the registry's `sliceable`:
linear, task arithmetic, the TIES/DARE/DELLA/breadcrumbs family, OTA) run slice by slice of
the flattened tensor in both engines (`merge_sliced`, same slices on the same device type),
so the resident merge needs only slice-sized float32 buffers besides the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mergetune.core.errors import ModelSetError, NonFiniteMergeError
from mergetune.merge.kernels import EAGER, Kernels
from mergetune.merge.methods import MethodSpec, TensorInputs, get_method
from mergetune.merge.methods.registry import StoredSlice, TensorSummaries
from mergetune.merge.sparsify import GlobalCut
from mergetune.merge.modelset import STAT_FIXES, STAT_NAMES, ModelSet
from mergetune.merge.recipe import Recipe, Rule, layer_position

# Slices of sliceable rules: cache-sized on a CPU for eager kernels (1 MB of float32: measured 2.4×
# faster than 64 MB slices), larger for compiled ones, whose fused loops stream from memory anyway and
# whose calls cost ~1 ms of Python each (4M entries, not 1M: resident re-merges of 102M params 10-15%
# faster; benchmarks/merge_speed.py), few kernel launches on a GPU. A 2-D tensor's slices are whole rows.
CHUNK_ELEMENTS = {"cpu": 1 << 18, "cpu.compiled": 1 << 22, "cuda": 1 << 24}


ExpertCuts = Callable[[str, str, float], GlobalCut]
"""(kind, expert name, keep fraction) → the expert's global cut (`thresholds.GlobalThresholds` / `SummaryThresholds`)."""


def chunk_elements(device_type: str, compiled: bool = False) -> int:
    if device_type == "cpu":
        return CHUNK_ELEMENTS["cpu.compiled" if compiled else "cpu"]
    return CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS["cuda"])


@dataclass
class RulePlan:
    """A recipe rule resolved once per merge (per layer position for rules with gradients): method,
    experts, weights, bound params, statistics to load."""

    index: int
    rule: Rule
    spec: MethodSpec
    experts: list[str]
    weights: list[float]
    kwargs: dict[str, object]
    stats: tuple[str, ...]

    @property
    def sliceable(self) -> bool:
        """Whether the method runs over slices of the flattened tensors (the registry's `sliceable`)."""
        return self.spec.sliceable

    def uses_deltas(self, has_base: bool) -> bool:
        """Whether this rule gets task vectors (τ_k) rather than the models (θ_k) themselves."""
        return has_base and self.spec.needs_base


def plan_rule(i: int, rule: Rule, recipe: Recipe, available: dict[str, set[str]]) -> RulePlan:
    """Rule `i` (without gradients: `Rule.at` evaluates them) checked against the statistics the model set has."""
    spec = get_method(rule.method)
    experts = rule.experts(recipe.experts)
    where = f"rules.{i}"
    for kind in sorted(spec.needs):
        missing = next((e for e in experts if e not in available[kind]), None)
        if missing is not None:
            raise ModelSetError(
                f"{where}: method '{rule.method}' needs {STAT_NAMES[kind]} for expert '{missing}'; "
                + STAT_FIXES[kind].format(expert=missing)
            )
    stats = stat_kinds(spec, experts, available)
    if spec.any_of and not set(stats) & spec.any_of:
        wanted = " or ".join(STAT_NAMES[kind] for kind in sorted(spec.any_of))
        first = sorted(spec.any_of)[0]
        raise ModelSetError(
            f"{where}: method '{rule.method}' needs {wanted} for every expert it merges; "
            + STAT_FIXES[first].format(expert=experts[0])
        )
    kwargs = spec.bind(rule.method_kwargs(recipe.experts), len(experts))
    return RulePlan(i, rule, spec, experts, rule.weight_list(recipe.experts), kwargs, stats)


def stat_kinds(spec: MethodSpec, experts: list[str], available: dict[str, set[str]]) -> tuple[str, ...]:
    """The statistics a method loads per tensor: all it needs, and each optional kind every expert has."""
    optional = tuple(kind for kind in sorted(spec.any_of) if all(e in available[kind] for e in experts))
    return (*sorted(spec.needs), *optional)


def tensor_schedule(modelset: ModelSet, recipe: Recipe) -> list[tuple[str, RulePlan | None]]:
    """Every tensor with the rule that merges it (None: keep the base's), after checking the recipe fits.

    Raises ModelSetError naming the rule, expert and fix when a method lacks its statistics.
    """
    unknown = next((e for e in recipe.experts if e not in modelset.experts), None)
    if unknown is not None:
        raise ModelSetError(f"recipe expert {unknown!r} is not in the model set; experts: {', '.join(modelset.experts)}")
    if recipe.base is not None and modelset.base is None:
        raise ModelSetError("the recipe has a base model but the model set has none")
    available = {kind: set(files) for kind, files in modelset.stats.items()}
    plans = [plan_rule(i, rule.at(0.0), recipe, available) for i, rule in enumerate(recipe.rules)]
    at_position: dict[tuple[int, float], RulePlan] = {}  # gradient rules: one plan per layer position
    num_layers = modelset.num_layers
    schedule = []
    for name in modelset.reference.infos:
        plan = next((p for p in plans if p.rule.matches(name)), None)
        if plan is not None and recipe.rules[plan.index].has_gradients:
            x = layer_position(name, num_layers)
            if (plan.index, x) not in at_position:
                at_position[plan.index, x] = plan_rule(plan.index, recipe.rules[plan.index].at(x), recipe, available)
            plan = at_position[plan.index, x]
        if plan is not None:
            for kind in plan.stats:
                if kind == "gram":
                    continue  # tensors without a Gram (not a linear weight) are averaged by RegMean
                missing = next((e for e in plan.experts if modelset.stats[kind][e].key(name) is None), None)
                if missing is not None:
                    raise ModelSetError(
                        f"{modelset.stats[kind][missing].path} has no entry for tensor {name!r}, which rules.{plan.index} "
                        f"merges with '{plan.rule.method}'; recompute the statistics for this model"
                    )
        schedule.append((name, plan))
    return schedule


def merge_tensor(
    plan: RulePlan,
    name: str,
    base: Tensor | None,
    models: list[Tensor] | None,
    deltas: list[Tensor] | None,
    stats: dict[str, list[Tensor] | None],
    seed: int,
    thresholds: ExpertCuts,
    stored: StoredSlice | None = None,
    **slice_fields: object,
) -> Tensor:
    """Run one rule's method on one tensor, or on a slice of it (`stored` inputs; `slice_fields`: `TensorInputs`'s
    offset, full_shape, summaries, totals, totals_pass, memo, kernels, out); float32 out, or `out` (the slice's
    destination) written by the method's kernel. A non-finite result stops the merge."""

    def cut(kind: str, index: int, keep: float) -> GlobalCut:
        return thresholds(kind, plan.experts[index], keep)

    inputs = TensorInputs(
        name=name,
        base=base,
        weights=plan.weights,
        models_given=models,
        deltas_given=deltas,
        stored=stored,
        moments=stats.get("moments"),
        fisher=stats.get("fisher"),
        gram=stats.get("gram"),
        global_cut=cut,
        seed=seed,
        **slice_fields,
    )
    out = plan.spec.fn(inputs, **plan.kwargs)
    if inputs.totals_pass:
        return out
    given = stored.models if stored is not None else (models if models is not None else deltas)
    reference = stored.base if stored is not None and stored.base is not None else (base if base is not None else given[0])
    if out.shape != reference.shape:
        raise ValueError(f"method '{plan.spec.name}' returned shape {list(out.shape)} for {name} {list(reference.shape)}")
    # The sum is one pass without a mask allocation; only a non-finite sum (or an overflow) looks closer.
    if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
        base = stored.base if stored is not None else base
        culprit = "the base model" if base is not None and not torch.isfinite(base).all() else next(
            (f"expert {e!r}" for e, t in zip(plan.experts, given) if not torch.isfinite(t).all()), None
        )
        cause = f"{culprit} has NaN/inf values in it; fix or drop that model" if culprit else "change the rule's params"
        raise NonFiniteMergeError(
            f"merged tensor {name!r} (rules.{plan.index}, {plan.spec.name}) has NaN/inf values: {cause}; the merge stopped"
        )
    return out


def complete_stats(tensors: list[Tensor | None]) -> list[Tensor] | None:
    """The per-expert statistics of one tensor, or None when an expert has none for it (e.g. no Gram)."""
    return None if any(t is None for t in tensors) else tensors  # type: ignore[return-value]


def merge_inputs(
    plan: RulePlan,
    name: str,
    base: Tensor | None,
    inputs: list[Tensor],
    stats: dict[str, list[Tensor] | None],
    seed: int,
    thresholds: ExpertCuts,
    **slice_fields: object,
) -> Tensor:
    """One rule on one tensor (or a slice of it, see `merge_tensor`) from its float32 inputs:
    τ_k when `plan.uses_deltas`, else θ_k."""
    if plan.uses_deltas(base is not None):
        return merge_tensor(plan, name, base, None, inputs, stats, seed, thresholds, **slice_fields)
    return merge_tensor(plan, name, base, inputs, None, stats, seed, thresholds, **slice_fields)


Slice = tuple[StoredSlice, dict[str, list[Tensor] | None]]
"""One slice's inputs, flat: base and models as stored, and float32 statistics by kind."""


def merge_sliced(
    plan: RulePlan,
    name: str,
    shape: tuple[int, ...],
    fetch: Callable[[int, int], Slice],
    out: Tensor,
    chunk: int,
    seed: int,
    thresholds: ExpertCuts,
    summaries: TensorSummaries | None,
    kernels: Kernels = EAGER,
    scratch: Callable[[object], Tensor] | None = None,
) -> Tensor:
    """A sliceable rule over slices [start, start + chunk) of the flattened tensor, into `out` (flat, at least the
    tensor's size: float32, or a sink's storage in its own dtype, each slice rounded to it once); returns `out`'s
    first entries as the tensor. `fetch(start, stop)` gives a slice's inputs as stored (the methods make float32
    task vectors of them in their kernels: float32(θ_k) − float32(θ₀)). `scratch(role)` gives a reusable flat float32
    buffer of at least `chunk` elements (a resident set's workspace; None: the methods allocate per tensor).

    A method that declares `totals` first sums its partial sums over every slice (float64, in slice order),
    then merges each slice with them.
    """
    n = math.prod(shape)
    if len(shape) == 2 and shape[1] <= chunk:
        chunk -= chunk % shape[1]  # whole rows: rank-1 moments reach a kernel as their factors (`moments.rank1_slice`)
    bounds = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    fields = {"full_shape": tuple(shape), "summaries": summaries, "memo": {}, "kernels": kernels, "scratch": scratch}
    totals = None
    if plan.spec.totals:
        for start, stop in bounds:
            stored, stats = fetch(start, stop)
            part = merge_tensor(plan, name, None, None, None, stats, seed, thresholds, stored, offset=start, totals_pass=True, **fields)
            if part.numel() == 0:
                break  # this rule's params need no sums
            totals = part if totals is None else totals + part
    for start, stop in bounds:
        stored, stats = fetch(start, stop)
        target = out[start:stop]
        merged = merge_tensor(plan, name, None, None, None, stats, seed, thresholds, stored, offset=start, totals=totals, out=target, **fields)
        if merged.data_ptr() != target.data_ptr():  # a method that made its own tensor (the kernels write into `target`)
            target.copy_(merged)
    return out[:n].view(shape)
