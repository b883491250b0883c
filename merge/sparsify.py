"""Sparsifiers for task vectors: which entries of τ survive, and how survivors are rescaled.

Density ρ is the fraction KEPT. Every sparsifier works on a slice of a tensor (elements
[offset, offset + n) of its flattened entries) as well as on the whole, with the same result:

- magnitude top-k (TIES trim): exactly k = max(1, ⌊ρ·n⌋) entries, the largest |τ|
- random drop (DARE): keep each entry i.i.d. with probability ρ
- rank-based drop (DELLA MagPrune): keep probability rises linearly with the |τ| rank per row
- breadcrumbs band: drop the top-γ outliers and the smallest entries, keep a band of ⌊ρ·n⌋
- FFG saliency: exactly k entries, the largest v·τ²

**Which entries "the largest k" are** — the rule every per-tensor selection here follows
(`sort_positions`, the reference): sort the flattened float32 scores with torch's default
(unstable) sort on the CPU, as mergekit's `sparsify.magnitude` (`argsort(descending=True)`)
and `magnitude_outliers` (`sort(descending=False)`) do; an entry's *position* in that order
decides. Top-k keeps positions [0, k) of the descending order; the breadcrumbs band keeps
positions [n_bot, n_bot + target) of the ascending order. Entries with equal scores are ordered
as torch's CPU sort (an introsort) leaves them: a deterministic function of the values alone,
but not index order, and not reproducible without that sort — so bf16 checkpoints, full of
equal magnitudes, keep exactly the entries mergekit keeps. The merge never sorts per trial:
`order_stats.TensorOrder` runs the sort once per tensor (task vectors never change in a
study) and its `Selection`s give the same masks from one compare pass.

Global scope (one top-k over all of an expert's tensors; no mergekit equivalent) keeps exactly
k = ⌊ρ·N⌋ entries too: every score above the k-th largest, then the entries equal to it in
model tensor order and, within a tensor, in its sort order (`GlobalCut`).

Random draws come from the counter-based generator (`counter_rng`): the mask of entry i is a
function of (seed, tensor name, expert, i), the same on every device and in every slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mergetune.core.errors import ConfigError
from mergetune.merge import kernels
from mergetune.merge.counter_rng import UNIFORM_BITS, keep_threshold
from mergetune.merge.kernels import EAGER
from mergetune.merge.order_stats import row_ranks

RescaleMode = Literal["inverse_keep", "l1"]
Scope = Literal["tensor", "global"]
SCOPES = ("tensor", "global")
SCORE_KINDS = ("magnitude", "saliency")
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


def scores_of(kind: str, tau: Tensor, moments: Tensor | None) -> Tensor:
    """A tensor's scores for selection: |τ| ("magnitude") or the FFG saliency v·τ² ("saliency")."""
    if kind == "magnitude":
        return tau.abs()
    if moments is None:
        raise ValueError("saliency scores need the second moments")
    return moments * tau.square()


# --- the per-tensor selection rule (the reference) ---


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


def band_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, target) of Model Breadcrumbs (mergekit 0.1.5): target = ⌊ρn⌋, n_top = ⌊γn⌋,
    n_bot = max(0, n − target − n_top); the band is ascending positions [n_bot, n_bot + target)."""
    target = int(density * n)
    return max(0, n - target - int(gamma * n)), target


def band_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs (the reference): ascending |τ| positions [n_bot, n_bot + target) (ρ ≥ 1 keeps everything)."""
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    n_bot, target = band_counts(tau.numel(), density, gamma)
    return position_mask(tau.abs(), n_bot, n_bot + target, descending=False)


def band_fractions(density: float, gamma: float) -> tuple[float, float]:
    """(top fraction dropped as outliers, top fraction that bounds the band from below) for global
    breadcrumbs: the band is the entries between these two top-fractions of |τ|."""
    top = min(max(gamma, 0.0), max(0.0, 1.0 - density))
    return top, min(1.0, top + max(density, 0.0))


# --- global scope: one cut over all of an expert's tensors ---


@dataclass(frozen=True)
class GlobalCut:
    """Exactly k of an expert's scores over all its tensors: those above `threshold` (the k-th largest), then
    those equal to it in tensor order — `ties[name]` is how many equal entries tensor `name` keeps, the first
    ones of its sort order. So a tensor keeps its top `count(...)` entries. threshold = +inf keeps nothing,
    −inf everything."""

    threshold: float
    ties: Mapping[str, int] = field(default_factory=dict)

    def count(self, name: str, greater: int) -> int:
        """How many of tensor `name`'s largest scores the cut keeps, given how many are above the threshold."""
        return greater + self.ties.get(name, 0)


KEEP_ALL = GlobalCut(-math.inf)
KEEP_NONE = GlobalCut(math.inf)


def global_cut(k: int, threshold: float, counts: Iterable[tuple[str, int, int]]) -> GlobalCut:
    """The cut keeping exactly k entries, given the k-th largest score and per tensor (in model order)
    (name, entries above the threshold, entries equal to it)."""
    counts = list(counts)
    left = k - sum(greater for _, greater, _ in counts)
    ties = {}
    for name, _, equal in counts:
        if left <= 0:
            break
        if equal:
            ties[name] = min(equal, left)
            left -= ties[name]
    return GlobalCut(threshold, ties)


# --- DELLA's keep probabilities ---


RAMP_FRACTION_BITS = 16  # the fixed-point bits of DELLA's per-rank step: its error stays under 1/4 of 2^-24 at r < 2^15


def della_ramp(row_length: int, density: float, epsilon: float) -> tuple[int, int, int, int]:
    """DELLA MagPrune's keep thresholds as integers (T₀, q, f, s): entry i is kept when its draw's top 24 bits are below
    T_i = T₀ + r_i·q + ⌊r_i·f / 2^s⌋ (`kernels.della_thresholds`), r_i its |τ| rank in its row (`order_stats.row_ranks`:
    ties in index order, so the ranks are the same on every device). So π_i = min(T_i, 2^24)/2^24 = (ρ−ε) + 2ε·r_i/(n−1)
    to within two units of 2^-24 (rows up to 2^15 entries; a longer row's step drifts by up to (n−1)/2^(s+1) more, 256
    units at 2^20): T₀ = ⌈(ρ−ε)·2^24⌉ (DARE's `keep_threshold`: ε = 0 keeps as DARE does), and the step
    2ε·2^24/(n−1) in fixed point, q + f/2^s, with s (16, fewer for rows over 2^15) such that r·f < 2^31 — int32 math.

    Departures from mergekit, which raises unless 0 < ρ±ε < 1 and yields NaN for 1-element rows: ε is
    shrunk to min(ε, ρ, 1−ρ) so any searched (ρ, ε) pair gives probabilities in [0, 1], and a 1-element
    row keeps with π = ρ.
    """
    epsilon = max(0.0, min(epsilon, density, 1.0 - density)) if row_length >= 2 else 0.0
    start = keep_threshold(density - epsilon)
    if epsilon == 0.0:
        return start, 0, 0, 0
    shift = min(RAMP_FRACTION_BITS, ((2**31 - 1) // (row_length - 1)).bit_length() - 1)
    step = round(2 * epsilon * 2 ** (UNIFORM_BITS + shift) / (row_length - 1))
    return start, step >> shift, step & ((1 << shift) - 1), shift


def della_probabilities(ranks: Tensor, row_length: int, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probabilities π_i = min(T_i, 2^24)/2^24 (float32, exact) of integer row `ranks` (`della_ramp`)."""
    return kernels.della_probabilities(kernels.della_thresholds(ranks, della_ramp(row_length, density, epsilon)))


def row_length(shape: tuple[int, ...]) -> int:
    """Entries per row of a tensor of `shape` for DELLA (rows are the first axis; a 1-D tensor is one row)."""
    return math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probabilities of a whole tensor (`della_probabilities` of its `row_ranks`)."""
    return della_probabilities(row_ranks(tau), row_length(tuple(tau.shape)), density, epsilon)


# --- rescale ---


def l1_factor(before: float, after: float) -> float | None:
    """mergekit's rescale: the factor restoring τ's L1 norm (float32 arithmetic), None when either norm < 1e-7."""
    if before < L1_EPS or after < L1_EPS:
        return None
    return float(torch.tensor(before, dtype=torch.float32) / torch.tensor(after, dtype=torch.float32))


def apply_mask(tau: Tensor, mask: Tensor | None, rescale: RescaleMode | None, keep: float | Tensor = 1.0, factor: float | None = None) -> Tensor:
    """τ with dropped entries zeroed (None: none dropped); survivors rescaled (`kernels.rescaled`).

    `l1` multiplies by `factor` (`l1_factor` of the whole tensor's norms before and after the mask;
    mergekit's `rescale: true`); `inverse_keep` divides by the keep probability (1/ρ for DARE, 1/π_i
    for DELLA; the papers); None: no rescale.
    """
    if mask is None:
        return tau
    divide_by = keep if rescale == "inverse_keep" and (isinstance(keep, Tensor) or keep > 0) else None
    return EAGER.rescaled(tau, mask, factor if rescale == "l1" else None, divide_by)


def l1_sums(tau: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ|τ|, Σ|τ̂|) in float64 (`kernels.l1_norm`) for τ̂ = τ·mask: the norms `l1_factor` compares, summable over slices."""
    return kernels.l1_norm(tau), kernels.l1_norm(masked)
