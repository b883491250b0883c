"""The task-arithmetic family as one definition (mergekit's generalized task arithmetic).

Per tensor: sparsify each expert's τ_k, rescale the survivors, then combine them (weights,
optional TIES sign election, normalisation, λ: `combine.combine`). The variants — ties,
dare_ties / dare_linear, della / della_linear, breadcrumbs / breadcrumbs_ties — are
registrations of `gta`, one module each, fixing the sparsifier, the consensus and mergekit's
defaults:

    magnitude  the top-k |τ| (TIES trim), per tensor or over the expert (`scope: global`)
    band       breadcrumbs: the |τ| band below the top-γ outliers
    random     DARE: keep with probability ρ
    magprune   DELLA: keep with a probability rising with the |τ| rank in the row

Every step is elementwise given per-tensor facts — a `Selection` from the tensor's order
statistics, the counter-based draws, DELLA's row ranks, the L1 norms before and after the
mask — so the family runs over slices of a tensor (`sliceable`); the L1 sums come from a first
pass over the slices (`totals`). Facts derived from the whole tensor live in `x.memo`.
"""

from __future__ import annotations


import torch
from torch import Tensor

from mergetune.core.errors import ConfigError
from mergetune.merge.counter_rng import check_range, keep_threshold, key_tensor, stream_key, tensor_key
from mergetune.merge.boundary import boundary, gathered, overwrite, patched_l1
from mergetune.merge.kernels import EAGER, ranks_carrier
from mergetune.merge.methods.combine import combine_weights
from mergetune.merge.methods.registry import PerModel, TensorInputs, per_model
from mergetune.merge.order_stats import Selection
from mergetune.merge.sparsify import (
    SCOPES,
    band_counts,
    band_fractions,
    check_choice,
    della_ramp,
    l1_factor,
    rescale_mode,
    row_length,
    topk_count,
)

SPARSIFIERS = ("magnitude", "band", "random", "magprune")
FRACTION_TOLERANCE = 1e-9  # ρ + γ sums like 0.9 + 0.1 land a hair below 1


def memoized(x: TensorInputs, key: tuple, make):
    """`x.memo[key]`, made on first use (once per tensor, not per slice: keys hash a name, tensors allocate)."""
    if key not in x.memo:
        x.memo[key] = make()
    return x.memo[key]


# --- selections: computed once per tensor from its order statistics, shared by its slices ---


def top_count(x: TensorInputs, kind: str, model: int, density: float, scope: str) -> int:
    """How many of the tensor's largest scores expert `model` keeps: k = max(1, ⌊ρn⌋) per tensor, or its
    share of the expert's global cut."""
    if scope == "tensor":
        return topk_count(density, x.numel)
    cut = x.cut(kind, model, density)
    return cut.count(x.name, x.order(kind, model, "desc").count_greater(cut.threshold))


def fraction_count(x: TensorInputs, model: int, fraction: float) -> int:
    """How many of the tensor's largest |τ| the expert's global cut at `fraction` keeps (all or none at the ends)."""
    if fraction <= FRACTION_TOLERANCE:
        return 0
    if fraction >= 1 - FRACTION_TOLERANCE:
        return x.numel
    return top_count(x, "magnitude", model, fraction, "global")


def top_selection(x: TensorInputs, kind: str, model: int, density: float, scope: str) -> Selection:
    """The entries of expert `model`'s top-ρ scores of `kind` (descending sort positions [0, count))."""
    key = ("top", kind, model, density, scope)
    if key not in x.memo:
        x.memo[key] = x.order(kind, model, "desc").top(top_count(x, kind, model, density, scope))
    return x.memo[key]


def band_selection(x: TensorInputs, model: int, density: float, gamma: float, scope: str) -> Selection:
    """Breadcrumbs: ascending |τ| positions [n_bot, n_bot + ⌊ρn⌋) per tensor (mergekit), or globally the entries
    between the expert's top-γ' and top-(γ'+ρ) cuts (`band_fractions`), descending positions [top, bottom)."""
    key = ("band", model, density, gamma, scope)
    if key not in x.memo:
        if scope == "tensor":
            n_bot, target = band_counts(x.numel, density, gamma)
            x.memo[key] = x.order("magnitude", model, "asc").select("asc", n_bot, n_bot + target)
        else:
            first, stop = (fraction_count(x, model, f) for f in band_fractions(density, gamma))
            x.memo[key] = x.order("magnitude", model, "desc").select("desc", first, stop)
    return x.memo[key]


def expert_selection(x: TensorInputs, sparsify: str, model: int, density: float, gamma: float, scope: str) -> Selection | None:
    """Expert `model`'s selection ("magnitude", "band" with ρ < 1), else None."""
    if sparsify == "magnitude" and density < 1:
        return top_selection(x, "magnitude", model, density, scope)
    if sparsify == "band" and density < 1:
        return band_selection(x, model, density, gamma, scope)
    return None


def expert_args(
    x: TensorInputs, sparsify: str, model: int, density: float, epsilon: float, gamma: float, scope: str, like: Tensor,
    factor: float | None = None, divide: bool = False, marks: Tensor | None = None,
) -> tuple | None:
    """Expert `model`'s arguments of `kernels.sparsified` on this slice (`like`): its selection's bounds and tie
    `marks` (`boundary`), or its stream of draws, and its rescale (the L1 `factor`, or `divide` by the keep
    probability: `rescale: inverse_keep`). ρ ≥ 1 keeps τ whole, spelled as the same kind of arguments (no bounds,
    probability 1), so every expert of a rule runs the same compiled kernel variant."""
    if density >= 1:
        factor, divide = None, False
    if sparsify in ("magnitude", "band") and density >= 1:
        return None, None, None, None, None
    if sparsify in ("magnitude", "band"):
        selection = expert_selection(x, sparsify, model, density, gamma, scope)
        return *selection.bounds(), marks, factor, density if divide else None
    if x.seed is None:
        raise ValueError(f"{x.name}: random draws need the merge's seed (TensorInputs.seed)")
    key = memoized(x, ("stream key", model, like.device), lambda: key_tensor(stream_key(x.seed, x.name, model), like.device))
    density = min(max(density, 0.0), 1.0)
    if sparsify == "random":
        threshold = memoized(x, ("keep threshold", model, like.device), lambda: key_tensor(keep_threshold(density), like.device))
        return key, threshold, factor, density if divide and density > 0 else None
    n = row_length(x.shape)
    # a CPU kernel's int32 copy of each slice's ranks: the engine's buffer (reused, no page faults: widening ran 4×
    # faster), else one per tensor reused by its slices (the first is the largest)
    buffer = memoized(x, ("ranks buffer", model), lambda: ranks_buffer(x, model, like))
    if buffer is not None and x.memo.get(("ranks held", model)) == x.offset:  # widened by the totals pass: a one-slice tensor
        ranks = buffer[: like.numel()].view(like.shape)
    else:
        ranks = ranks_carrier(x.row_ranks(model).reshape(-1)[x.offset : x.offset + like.numel()].to(like.device).view(like.shape), buffer)
        if buffer is not None and ranks.data_ptr() == buffer.data_ptr():
            x.memo[("ranks held", model)] = x.offset
    ramp = memoized(x, ("ramp", model, like.device), lambda: tuple(key_tensor(v, like.device) for v in della_ramp(n, density, epsilon)))
    return key, ranks, ramp, factor, divide


def ranks_buffer(x: TensorInputs, model: int, like: Tensor) -> Tensor | None:
    """Where a CPU kernel's int32 ranks of expert `model` go (`kernels.ranks_carrier`); None off the CPU."""
    if like.device.type != "cpu":
        return None
    if x.scratch is not None:
        return x.scratch(("ranks", model)).view(torch.int32)
    return torch.empty(like.numel(), dtype=torch.int32)


def l1_sums(x: TensorInputs, base: Tensor, given: list[Tensor], stored: bool, sparsify: str, experts: list[tuple], offset: Tensor, key: Tensor) -> Tensor:
    """The slice's float64 [Σ|τ_k|, Σ|τ̂_k|] of the rescaled `experts` (`kernels.gta_l1_sums`): the Σ|τ_k| a study's
    earlier merge summed (the engine's `TensorSummaries`) are read, not summed again (DARE: 3.9 → 2.7 ns per element)."""
    summaries, start, stop = x.summaries, x.offset, x.offset + given[0].numel()
    norms = None if summaries is None else [summaries.task_vector_l1(m, start, stop) for m, _ in experts]
    if norms is not None and all(total is not None for total in norms):
        masked = x.kernels.gta_l1_sums(base, given, stored, sparsify, experts, offset, key, False)
        return torch.stack([total for pair in zip(norms, masked) for total in pair])
    totals = x.kernels.gta_l1_sums(base, given, stored, sparsify, experts, offset, key)
    if summaries is not None:
        for i, (m, _) in enumerate(experts):
            summaries.keep_task_vector_l1(m, start, stop, totals[2 * i].clone())
    return totals


def gta(
    x: TensorInputs,
    method: str,
    *,
    sparsify: str,
    consensus: bool,
    density: PerModel,
    lambda_: float,
    normalize: bool,
    rescale: object,
    epsilon: PerModel = 0.0,
    gamma: PerModel = 0.0,
    scope: str = "tensor",
) -> Tensor:
    """θ₀ + λ·combine(rescale(sparsify(τ_k))) on this tensor or slice; with `x.totals_pass`, the slice's L1 sums."""
    check_choice(method, "scope", scope, SCOPES)
    if sparsify not in SPARSIFIERS:
        raise ConfigError(f"method '{method}': unknown sparsifier {sparsify!r}")
    mode = rescale_mode(method, rescale)
    k = x.num_models
    rho, eps, gammas = per_model(density, k), per_model(epsilon, k), per_model(gamma, k)
    stored = x.stored is not None
    base, given = (x.stored.base, x.stored.models) if stored else (x.base, x.deltas)
    if base is None:
        raise ValueError(f"{x.name}: '{method}' needs a base model")
    device = given[0].device
    key = memoized(x, ("tensor key", device), lambda: key_tensor(tensor_key(x.seed or 0, x.name), device))
    offset = memoized(x, ("offset", x.offset, device), lambda: key_tensor(x.offset, device))
    if sparsify in ("random", "magprune"):
        check_range(x.offset, given[0].numel())

    selections = [expert_selection(x, sparsify, m, rho[m], gammas[m], scope) for m in range(k)]
    # made once per slice for both passes; the merge pass takes it out, so the memo never holds every slice's marks
    edges = x.memo.pop(("boundary", x.offset), None) or boundary(selections, x.numel, x.offset, given[0], x.kernels.mark_dtype(device))
    if x.totals_pass:
        x.memo[("boundary", x.offset)] = edges

    def args(m: int, factor: float | None = None, divide: bool = False, marks: list[Tensor | None] = edges.kernel_marks) -> tuple | None:
        return expert_args(x, sparsify, m, rho[m], eps[m], gammas[m], scope, given[m], factor, divide, marks[m])

    rescaled = [m for m in range(k) if mode == "l1" and rho[m] < 1]
    totals = x.totals
    if x.totals_pass or (rescaled and totals is None and not x.is_slice):
        if rescaled:
            totals = l1_sums(x, base, given, stored, sparsify, [(m, args(m)) for m in rescaled], offset, key)
            for i, m in enumerate(rescaled):  # the patched entries the kernel's bounds left out are kept too
                if edges.patched[m] is not None:
                    totals[2 * i + 1] += patched_l1(base, given[m], stored, edges.patched[m])
        else:
            totals = torch.zeros(0, dtype=torch.float64)
        if x.totals_pass:
            return totals
    if rescaled and totals is None:
        raise ValueError(f"{x.name}: a slice of '{method}' with rescale needs the tensor's L1 norms (TensorInputs.totals)")
    factors = {m: l1_factor(float(totals[2 * i]), float(totals[2 * i + 1])) for i, m in enumerate(rescaled)}
    experts = [args(m, factors.get(m), mode == "inverse_keep") for m in range(k)]
    weights, total = combine_weights(x.weights, consensus, normalize)
    merged = x.kernels.gta_slice(base, given, stored, sparsify, experts, offset, key, weights, consensus, normalize, total, lambda_, x.out)
    if edges.at is None:
        return merged
    at = edges.at
    marked = [args(m, factors.get(m), mode == "inverse_keep", edges.patch_marks) for m in range(k)]
    patch = EAGER.gta_slice(gathered(base, at), [gathered(g, at) for g in given], stored, sparsify, marked, offset, key, weights, consensus, normalize, total, lambda_)
    return overwrite(merged, at, patch)
