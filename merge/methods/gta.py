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

from torch import Tensor

from mergetune.merge.counter_rng import hashed_index, stream_bits, stream_key, tensor_key
from mergetune.merge.methods.combine import combine
from mergetune.merge.methods.registry import PerModel, TensorInputs, per_model
from mergetune.merge.order_stats import Selection
from mergetune.merge.sparsify import (
    SCOPES,
    apply_mask,
    band_counts,
    band_fractions,
    check_choice,
    della_probabilities,
    l1_factor,
    l1_sums,
    random_keep,
    rescale_mode,
    row_length,
    topk_count,
)
from mergetune.core.errors import ConfigError
from mergetune.merge.counter_rng import keep_from_bits

import torch

SPARSIFIERS = ("magnitude", "band", "random", "magprune")
FRACTION_TOLERANCE = 1e-9  # ρ + γ sums like 0.9 + 0.1 land a hair below 1


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


class Draws:
    """The slice's counter-based draws: the first hash round once, then one stream per expert."""

    def __init__(self, x: TensorInputs, like: Tensor) -> None:
        self.x, self.like = x, like
        self._hashed: Tensor | None = None

    def bits(self, model: int) -> Tensor:
        x = self.x
        if x.seed is None:
            raise ValueError(f"{x.name}: random draws need the merge's seed (TensorInputs.seed)")
        if self._hashed is None:
            self._hashed = hashed_index(tensor_key(x.seed, x.name), x.offset, self.like.numel(), self.like.device)
        return stream_bits(self._hashed, stream_key(x.seed, x.name, model)).view(self.like.shape)


def sparsified(
    x: TensorInputs, sparsify: str, model: int, density: float, epsilon: float, gamma: float, scope: str, draws: Draws
) -> tuple[Tensor | None, float | Tensor]:
    """(keep-mask of expert `model`'s τ on this slice — None keeps everything —, keep probability for `inverse_keep`)."""
    if density >= 1:
        return None, 1.0
    tau = x.deltas[model]
    if sparsify == "magnitude":
        return top_selection(x, "magnitude", model, density, scope).mask(tau.abs(), x.offset, x.numel), density
    if sparsify == "band":
        return band_selection(x, model, density, gamma, scope).mask(tau.abs(), x.offset, x.numel), density
    if sparsify == "random":
        return random_keep(draws.bits(model), density), density
    ranks = x.row_ranks(model).reshape(-1)[x.offset : x.offset + tau.numel()].to(tau.device).view(tau.shape)
    probs = della_probabilities(ranks, row_length(x.shape), max(density, 0.0), epsilon)
    return keep_from_bits(draws.bits(model), probs), probs


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
    draws = Draws(x, x.deltas[0])
    masked = [sparsified(x, sparsify, m, rho[m], eps[m], gammas[m], scope, draws) for m in range(k)]
    rescaled = [m for m in range(k) if mode == "l1" and masked[m][0] is not None]
    if x.totals_pass:
        return l1_partials(x, masked, rescaled)
    totals = x.totals if x.totals is not None else (l1_partials(x, masked, rescaled) if not x.is_slice else None)
    if rescaled and totals is None:
        raise ValueError(f"{x.name}: a slice of '{method}' with rescale needs the tensor's L1 norms (TensorInputs.totals)")
    factors = {m: l1_factor(float(totals[2 * i]), float(totals[2 * i + 1])) for i, m in enumerate(rescaled)}
    deltas = [apply_mask(tau, mask, mode, keep, factors.get(m)) for m, (tau, (mask, keep)) in enumerate(zip(x.deltas, masked))]
    return combine(x.base, deltas, x.weights, consensus=consensus, normalize=normalize, lambda_=lambda_)


def l1_partials(x: TensorInputs, masked: list[tuple[Tensor | None, object]], rescaled: list[int]) -> Tensor:
    """float64 [Σ|τ_m|, Σ|τ_m·mask_m|] for each rescaled expert m, in order (empty when none is rescaled)."""
    sums = [s for m in rescaled for s in l1_sums(x.deltas[m], masked[m][0])]
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64)
