"""Sparsifiers for task vectors: which entries of τ survive, and how survivors are rescaled.

Each `*_mask` function returns a boolean keep-mask for one expert's τ (float32, any shape);
`apply_mask` zeroes the dropped entries and rescales the survivors. Masks are composable
with any combination rule (see `methods/combine.py`).

- magnitude top-k (TIES trim): keep |τ| ≥ the k-th largest |τ|, k = max(1, ⌊ρ·n⌋)
- random drop (DARE): keep each entry i.i.d. with probability ρ
- rank-based drop (DELLA MagPrune): keep probability rises linearly with the |τ| rank per row
- breadcrumbs band: drop the top-γ outliers and the smallest entries, keep a band of ρ·n
- FFG saliency: keep v·τ² ≥ the k-th largest saliency

Scope: per tensor by default; for global scope the caller passes the expert's threshold
over all its tensors (`TensorInputs.threshold`) and the mask is `score ≥ threshold`.
Randomness only from the given `torch.Generator` (CPU, so the bytes do not depend on the
device); density ρ is the fraction KEPT.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mergetune.core.errors import ConfigError

RescaleMode = Literal["inverse_keep", "l1"]
Scope = Literal["tensor", "global"]
RESCALE_MODES = ("inverse_keep", "l1")
SCOPES = ("tensor", "global")
L1_EPS = 1e-7  # mergekit: skip L1 matching when either norm is below this


def check_choice(method: str, param: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"method '{method}': {param} must be one of {', '.join(allowed)}, not {value!r}")


def topk_threshold(scores: Tensor, density: float) -> float:
    """The k-th largest score, k = max(1, ⌊ρ·n⌋): keeping `scores ≥ it` keeps ≥ k entries.

    A tensor too small for k ≥ 1 keeps its largest entry (mergekit asserts in older versions).
    """
    flat = scores.reshape(-1)
    k = max(1, int(density * flat.numel()))
    return flat.kthvalue(flat.numel() - k + 1).values.item()


def score_mask(scores: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """Keep the top-ρ scores of this tensor, or `scores ≥ threshold` when a global one is given."""
    if density >= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    if density <= 0 or scores.numel() == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if threshold is None:
        threshold = topk_threshold(scores, density)
    return scores >= threshold


def magnitude_mask(tau: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """TIES trim: keep the largest |τ| (top-k per tensor, or |τ| ≥ a global threshold)."""
    return score_mask(tau.abs(), density, threshold)


def saliency(tau: Tensor, moments: Tensor) -> Tensor:
    """FFG saliency v·τ² (v: Adam second moment, a diagonal-Fisher proxy)."""
    return moments * tau.square()


def saliency_mask(tau: Tensor, moments: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """FFG: keep the entries with the largest v·τ² (top-k per tensor or ≥ a global threshold)."""
    return score_mask(saliency(tau, moments), density, threshold)


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


def rank_mask(tau: Tensor, density: float, epsilon: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """DELLA: (keep-mask, per-entry keep probability π); larger |τ| are more likely kept."""
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool), torch.ones_like(tau)
    if density <= 0:
        return torch.zeros_like(tau, dtype=torch.bool), torch.zeros_like(tau)
    probs = della_keep_probabilities(tau, density, epsilon)
    return uniform(tau.shape, generator, tau.device) < probs, probs


def band_mask(
    tau: Tensor, density: float, gamma: float, thresholds: tuple[float, float] | None = None
) -> Tensor:
    """Model Breadcrumbs (mergekit 0.1.5): drop the top-γ |τ| outliers, keep the next ⌊ρ·n⌋.

    Per tensor: rank |τ| ascending, n_top = ⌊γn⌋, target = ⌊ρn⌋, n_bot = max(0, n − target − n_top);
    keep ranks [n_bot, n_bot + target). ρ ≥ 1 keeps everything (outliers included, as mergekit).
    With global `thresholds` (hi, lo): keep lo ≤ |τ| < hi; see `band_fractions`.
    """
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    magnitude = tau.abs()
    if thresholds is not None:
        hi, lo = thresholds
        return (magnitude < hi) & (magnitude >= lo)
    n = tau.numel()
    target = int(density * n)
    if target == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    n_bot = max(0, n - target - int(gamma * n))
    # Ascending ranks [n_bot, n_bot + target) are the values between two order statistics
    # (two selections instead of mergekit's full sort; equal magnitudes at a bound are all kept).
    flat = magnitude.reshape(-1)
    lo = flat.kthvalue(n_bot + 1).values
    hi = flat.kthvalue(n_bot + target).values
    return (magnitude >= lo) & (magnitude <= hi)


def band_fractions(density: float, gamma: float) -> tuple[float, float]:
    """(top fraction dropped as outliers, top fraction that bounds the band from below) for global
    breadcrumbs: the band is the entries between these two top-fractions of |τ|."""
    top = min(max(gamma, 0.0), max(0.0, 1.0 - density))
    return top, min(1.0, top + max(density, 0.0))


def apply_mask(tau: Tensor, mask: Tensor, rescale: RescaleMode | None, keep: float | Tensor = 1.0) -> Tensor:
    """τ with dropped entries zeroed; survivors rescaled.

    `inverse_keep` divides by the keep probability (1/ρ for DARE, 1/π_i for DELLA; the papers);
    `l1` restores the L1 norm of τ (mergekit ≥ 0.1; skipped when either norm < 1e-7); None: no rescale.
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
