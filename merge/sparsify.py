"""Sparsifiers for task vectors: which entries of τ survive, and how survivors are rescaled.

Each `*_mask` function returns a boolean keep-mask for one expert's τ (float32, any shape);
`apply_mask` zeroes the dropped entries and rescales the survivors. Masks are composable
with any combination rule (see `methods/combine.py`). Density ρ is the fraction KEPT.

- magnitude top-k (TIES trim): exactly k = max(1, ⌊ρ·n⌋) entries, the largest |τ|
- random drop (DARE): keep each entry i.i.d. with probability ρ
- rank-based drop (DELLA MagPrune): keep probability rises linearly with the |τ| rank per row
- breadcrumbs band: drop the top-γ outliers and the smallest entries, keep a band of ⌊ρ·n⌋
- FFG saliency: exactly k entries, the largest v·τ²

**Which entries "the largest k" are** — the rule every per-tensor selection here follows, and
that any faster implementation must reproduce bit for bit (`sort_positions`): sort the
flattened float32 scores with torch's default (unstable) sort on the CPU, as mergekit's
`sparsify.magnitude` (`argsort(descending=True)`) and `magnitude_outliers`
(`sort(descending=False)`) do; an entry's *position* in that order decides. Top-k keeps
positions [0, k) of the descending order; the breadcrumbs band keeps positions
[n_bot, n_bot + target) of the ascending order. Entries with equal scores are ordered as
torch's CPU sort leaves them: a deterministic function of the values alone (same on every
run, thread count and device, because the sort always runs on the CPU) but not index order
(the sort is unstable for more than 16 entries), so bf16 checkpoints, full of equal
magnitudes, keep exactly the entries mergekit keeps. A fast version may precompute the
positions once per tensor (task vectors never change in a study) and compare them with k.

Global scope (one top-k over all of an expert's tensors; no mergekit equivalent) keeps
exactly k = ⌊ρ·N⌋ entries too: every score above the k-th largest, then the entries equal
to it in model tensor order and, within a tensor, flat-index order (`GlobalCut`).
Randomness only from the given `torch.Generator` (CPU, so the bytes do not depend on the device).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mergetune.core.errors import ConfigError

RescaleMode = Literal["inverse_keep", "l1"]
Scope = Literal["tensor", "global"]
SCOPES = ("tensor", "global")
L1_EPS = 1e-7  # mergekit: skip L1 matching when either norm is below this


def check_choice(method: str, param: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"method '{method}': {param} must be one of {', '.join(allowed)}, not {value!r}")


def rescale_mode(method: str, rescale: object) -> RescaleMode | None:
    """The `apply_mask` mode for a method's `rescale` param, spelled as in mergekit.

    `true` is mergekit's rescale (restore the L1 norm of τ), `false` none, and `inverse_keep`
    ours: divide each survivor by its keep probability (1/ρ; DELLA's 1/π_i), as the DARE and
    DELLA papers (and mergekit before 0.1) do.
    """
    if isinstance(rescale, bool):
        return "l1" if rescale else None
    if rescale == "inverse_keep":
        return "inverse_keep"
    raise ConfigError(
        f"method '{method}': rescale must be true (restore the L1 norm, mergekit's rescale), false, "
        f"or inverse_keep (divide survivors by their keep probability), not {rescale!r}"
    )


# --- the per-tensor selection rule ---


def sort_positions(scores: Tensor, *, descending: bool) -> Tensor:
    """Every entry's position (int64, shape of `scores`) in mergekit's sort order of the scores.

    The order is `torch.sort(scores.reshape(-1).float().cpu(), descending=descending)` with
    torch's default unstable sort (the tie order mergekit's argsort gives on the CPU; see the
    module docstring). Positions, not values, decide every per-tensor selection here.
    """
    flat = scores.detach().reshape(-1).to("cpu", torch.float32)
    order = torch.sort(flat, descending=descending).indices
    positions = torch.empty_like(order)
    positions[order] = torch.arange(order.numel())
    return positions.reshape(scores.shape).to(scores.device)


def position_mask(scores: Tensor, start: int, stop: int, *, descending: bool) -> Tensor:
    """Keep the entries at positions [start, stop) of the sort order (`sort_positions`)."""
    if stop <= start or scores.numel() == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if start <= 0 and stop >= scores.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    positions = sort_positions(scores, descending=descending)
    return (positions >= start) & (positions < stop)


def topk_count(density: float, n: int) -> int:
    """k = max(1, ⌊ρ·n⌋) for 0 < ρ < 1 (a nonempty tensor keeps at least one entry), n for ρ ≥ 1, 0 for ρ ≤ 0."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def topk_mask(scores: Tensor, density: float) -> Tensor:
    """Exactly k = max(1, ⌊ρ·n⌋) entries: positions [0, k) of the descending order (mergekit's `magnitude`)."""
    return position_mask(scores, 0, topk_count(density, scores.numel()), descending=True)


# --- global scope: one cut over all of an expert's tensors ---


@dataclass(frozen=True)
class GlobalCut:
    """Exactly k of an expert's scores over all its tensors: those above `threshold` (the k-th
    largest), then those equal to it in tensor order and flat-index order — `ties[name]` is how
    many equal entries tensor `name` keeps. threshold = +inf keeps nothing, −inf everything."""

    threshold: float
    ties: Mapping[str, int] = field(default_factory=dict)

    def mask(self, name: str, scores: Tensor) -> Tensor:
        keep = scores > self.threshold
        quota = self.ties.get(name, 0)
        if quota:
            tied = (scores == self.threshold).reshape(-1)
            first = tied & (tied.cumsum(0) <= quota)
            keep |= first.reshape(scores.shape)
        return keep


KEEP_ALL = GlobalCut(-math.inf)
KEEP_NONE = GlobalCut(math.inf)


def global_cut(k: int, threshold: float, tensors: Iterable[tuple[str, Tensor]]) -> GlobalCut:
    """The cut keeping exactly k entries, given the k-th largest score and the scores by tensor (in model order)."""
    counts = []
    above = 0
    for name, scores in tensors:
        above += int((scores > threshold).sum())
        counts.append((name, int((scores == threshold).sum())))
    left = k - above
    ties = {}
    for name, count in counts:
        if left <= 0:
            break
        if count:
            ties[name] = min(count, left)
            left -= ties[name]
    return GlobalCut(threshold, ties)


# --- masks ---

TensorCut = Callable[[Tensor], Tensor]
"""The keep-mask of one tensor's scores under its expert's `GlobalCut` (see `TensorInputs.cut`)."""


def magnitude_mask(tau: Tensor, density: float, cut: TensorCut | None = None) -> Tensor:
    """TIES trim: the largest |τ| — exactly k per tensor (`topk_mask`), or the expert's global cut."""
    return cut(tau.abs()) if cut is not None else topk_mask(tau.abs(), density)


def saliency(tau: Tensor, moments: Tensor) -> Tensor:
    """FFG saliency v·τ² (v: Adam second moment, a diagonal-Fisher proxy)."""
    return moments * tau.square()


def saliency_mask(tau: Tensor, moments: Tensor, density: float, cut: TensorCut | None = None) -> Tensor:
    """FFG: the largest v·τ² — exactly k per tensor (`topk_mask`), or the expert's global cut."""
    scores = saliency(tau, moments)
    return cut(scores) if cut is not None else topk_mask(scores, density)


def uniform(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    """U[0,1) draws made on the CPU generator (device-independent bytes), moved to `device`."""
    return torch.rand(shape, generator=generator, dtype=torch.float32).to(device)


def random_mask(tau: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry independently with probability ρ."""
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    return uniform(tau.shape, generator, tau.device) < density


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MagPrune keep probabilities π = (ρ−ε) + 2ε·r̃ per row, r̃ = (rank−1)/(n−1) of |τ|.

    Rows are the first axis (a 1-D tensor is one row). Departures from mergekit, which raises
    unless 0 < ρ±ε < 1 and yields NaN for 1-element rows: ε is shrunk to min(ε, ρ, 1−ρ) so any
    searched (ρ, ε) pair gives probabilities in [0, 1], and a 1-element row keeps with π = ρ.
    """
    epsilon = max(0.0, min(epsilon, density, 1.0 - density))
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    if n < 2:
        return torch.full_like(tau, density)
    order = rows.abs().argsort(dim=1)
    positions = torch.arange(n, dtype=torch.float32, device=tau.device).expand_as(rows)
    ranks = torch.empty_like(rows).scatter_(1, order, positions)  # 0 = smallest |τ| of the row
    probs = (density - epsilon) + (2 * epsilon / (n - 1)) * ranks
    return probs.reshape(tau.shape)


def magprune_mask(tau: Tensor, density: float, epsilon: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """DELLA: (keep-mask, per-entry keep probability π); larger |τ| are more likely kept."""
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool), torch.ones_like(tau)
    if density <= 0:
        return torch.zeros_like(tau, dtype=torch.bool), torch.zeros_like(tau)
    probs = della_keep_probabilities(tau, density, epsilon)
    return uniform(tau.shape, generator, tau.device) < probs, probs


def band_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, target) of Model Breadcrumbs (mergekit 0.1.5): target = ⌊ρn⌋, n_top = ⌊γn⌋,
    n_bot = max(0, n − target − n_top); the band is ascending positions [n_bot, n_bot + target)."""
    target = int(density * n)
    return max(0, n - target - int(gamma * n)), target


def band_mask(tau: Tensor, density: float, gamma: float, cuts: tuple[TensorCut, TensorCut] | None = None) -> Tensor:
    """Model Breadcrumbs: drop the top-γ |τ| outliers, keep the next ⌊ρ·n⌋ (ρ ≥ 1 keeps everything, as mergekit).

    Per tensor: ascending positions [n_bot, n_bot + target) of |τ| (`band_counts`, `sort_positions`).
    With global `cuts` (outliers, band bottom): kept by the bottom cut and not by the outlier cut.
    """
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    magnitude = tau.abs()
    if cuts is not None:
        outliers, bottom = cuts
        return bottom(magnitude) & ~outliers(magnitude)
    n_bot, target = band_counts(tau.numel(), density, gamma)
    return position_mask(magnitude, n_bot, n_bot + target, descending=False)


def band_fractions(density: float, gamma: float) -> tuple[float, float]:
    """(top fraction dropped as outliers, top fraction that bounds the band from below) for global
    breadcrumbs: the band is the entries between these two top-fractions of |τ|."""
    top = min(max(gamma, 0.0), max(0.0, 1.0 - density))
    return top, min(1.0, top + max(density, 0.0))


def apply_mask(tau: Tensor, mask: Tensor, rescale: RescaleMode | None, keep: float | Tensor = 1.0) -> Tensor:
    """τ with dropped entries zeroed; survivors rescaled.

    `l1` restores the L1 norm of τ (mergekit's `rescale: true`; skipped when either norm < 1e-7);
    `inverse_keep` divides by the keep probability (1/ρ for DARE, 1/π_i for DELLA; the papers);
    None: no rescale.
    """
    masked = tau * mask
    if rescale is None:
        return masked
    if rescale == "inverse_keep":
        if isinstance(keep, Tensor):
            return torch.where(mask, masked / keep.clamp_min(torch.finfo(torch.float32).tiny), masked)
        return masked / keep if keep > 0 else masked
    before, after = tau.abs().sum(), masked.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)
