"""The per-tensor rule plan: which recipe rule merges each tensor, and running one rule on one tensor.

Both merge engines (disk to disk in `engine.py`, the search worker's `resident.py`) call
the same functions here with the same float32 inputs — the base θ₀ and, when there is a
base, the task vectors τ_k = θ_k − θ₀ made in float32 from the stored tensors — so a trial
and its export are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergetune.core.errors import ModelSetError
from mergetune.merge.methods import MethodSpec, TensorInputs, get_method, tensor_generator
from mergetune.merge.modelset import STAT_FIXES, STAT_NAMES, ModelSet
from mergetune.merge.recipe import Recipe, Rule
from mergetune.merge.thresholds import GlobalThresholds


@dataclass
class RulePlan:
    """A recipe rule resolved once per merge: method, experts, weights, bound params, statistics to load.

    `combination` is set for rules that are a fixed linear combination (see `linear_combination`):
    they are summed in place, element by element, without the method library.
    """

    index: int
    rule: Rule
    spec: MethodSpec
    experts: list[str]
    weights: list[float]
    kwargs: dict[str, object]
    stats: tuple[str, ...]
    combination: tuple[float, list[float]] | None = None

    def uses_deltas(self, has_base: bool) -> bool:
        """Whether this rule gets task vectors (τ_k) rather than the models (θ_k) themselves."""
        return has_base and (self.spec.needs_base or self.combination is not None)


def plan_rule(i: int, rule: Rule, recipe: Recipe, available: dict[str, set[str]]) -> RulePlan:
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
    plan = RulePlan(i, rule, spec, experts, rule.weight_list(recipe.experts), kwargs, stats)
    plan.combination = linear_combination(plan)
    return plan


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
    plans = [plan_rule(i, rule, recipe, available) for i, rule in enumerate(recipe.rules)]
    schedule = []
    for name in modelset.reference.infos:
        plan = next((p for p in plans if p.rule.matches(name)), None)
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
    thresholds: GlobalThresholds,
) -> Tensor:
    """Run one rule's method on one tensor (float32 in, float32 out)."""

    def threshold(kind: str, index: int, keep: float) -> float:
        return thresholds(kind, plan.experts[index], keep)

    inputs = TensorInputs(
        name=name,
        base=base,
        weights=plan.weights,
        models_given=models,
        deltas_given=deltas,
        moments=stats.get("moments"),
        fisher=stats.get("fisher"),
        gram=stats.get("gram"),
        generator=tensor_generator(seed, name),
        global_threshold=threshold,
    )
    out = plan.spec.fn(inputs, **plan.kwargs)
    reference = base if base is not None else (models or deltas)[0]
    if out.shape != reference.shape:
        raise ValueError(f"method '{plan.spec.name}' returned shape {list(out.shape)} for {name} {list(reference.shape)}")
    return out


def complete_stats(tensors: list[Tensor | None]) -> list[Tensor] | None:
    """The per-expert statistics of one tensor, or None when an expert has none for it (e.g. no Gram)."""
    return None if any(t is None for t in tensors) else tensors  # type: ignore[return-value]


def combine_into(out: Tensor, base: Tensor | None, inputs: list[Tensor], combination: tuple[float, list[float]]) -> Tensor:
    """out ← base_coefficient·θ₀ + Σ c_k·inputs_k (τ_k, or θ_k without a base): one pass per input, in place.

    Elementwise, so a caller may apply it to matching slices of every tensor and get the same bytes.
    """
    base_coefficient, coefficients = combination
    if base is not None:
        torch.mul(base, base_coefficient, out=out)
    else:
        out.zero_()
    for tensor, c in zip(inputs, coefficients):
        if c != 0.0:
            out.add_(tensor, alpha=c)
    return out


COMBINATION_METHODS = frozenset({"linear", "task_arithmetic"})  # see `linear_combination`


def linear_combination(plan: RulePlan) -> tuple[float, list[float]] | None:
    """(base coefficient, per-expert coefficients) for methods that are a fixed linear combination,
    mirroring `methods/linear.py` and `methods/task_arithmetic.py` (tests compare both paths)."""

    def param(public: str) -> object:
        spec = plan.spec.params[public]
        return plan.kwargs.get(spec.arg, spec.default)

    weights, total = plan.weights, sum(plan.weights)
    if plan.spec.name == "linear":
        divisor = total if param("normalize") and abs(total) > 1e-8 else 1.0
        return total / divisor, [w / divisor for w in weights]
    if plan.spec.name == "task_arithmetic":
        divisor = total if param("normalize") and abs(total) >= 1e-8 else 1.0
        scale = float(param("lambda"))
        return 1.0, [scale * w / divisor for w in weights]
    return None


def merge_inputs(
    plan: RulePlan,
    name: str,
    base: Tensor | None,
    inputs: list[Tensor],
    stats: dict[str, list[Tensor] | None],
    seed: int,
    thresholds: GlobalThresholds,
) -> Tensor:
    """One rule on one tensor from its float32 inputs: τ_k when `plan.uses_deltas`, else θ_k."""
    if plan.combination is not None:
        return combine_into(torch.empty_like(inputs[0]), base, inputs, plan.combination)
    if plan.uses_deltas(base is not None):
        return merge_tensor(plan, name, base, None, inputs, stats, seed, thresholds)
    return merge_tensor(plan, name, base, inputs, None, stats, seed, thresholds)
