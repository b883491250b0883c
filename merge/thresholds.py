"""Global cuts: per expert, which entries of all its tensors a global top-k keeps (exactly k of them).

Two sources give the same `sparsify.GlobalCut`, cached per (kind, expert, keep) for the study:
`GlobalThresholds` streams an expert's scores (the disk engine, which reads each tensor once
anyway), `SummaryThresholds` reads the per-tensor order statistics the search worker keeps
(no pass over the tensors: a trial's new density costs a few binary searches per tensor).
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from mergetune.merge.order_stats import TensorOrder
from mergetune.merge.sparsify import KEEP_ALL, KEEP_NONE, GlobalCut, global_cut, scores_of

log = logging.getLogger(__name__)


class _Cached:
    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, float], GlobalCut] = {}

    def __call__(self, kind: str, expert: str, keep: float) -> GlobalCut:
        key = (kind, expert, float(keep))
        if key not in self._cache:
            started = time.perf_counter()
            self._cache[key] = self._compute(kind, expert, float(keep))
            log.debug("global %s cut of %s at %.3f: %.3g (%.2fs)", kind, expert, keep, self._cache[key].threshold, time.perf_counter() - started)
        return self._cache[key]

    def _compute(self, kind: str, expert: str, keep: float) -> GlobalCut:
        raise NotImplementedError


class GlobalThresholds(_Cached):
    """Per-expert global top-k cuts over all of the expert's tensors (`sparsify.GlobalCut`), from streamed scores.

    The cut for keep fraction ρ keeps exactly k = ⌊ρN⌋ entries: its threshold is the k-th largest
    score — exact `kthvalue` when the scores fit in `exact_limit` elements, else a histogram of
    log-scores and an exact pass over the bracketing bin — and one more pass counts the entries
    above and equal to it per tensor. Kinds: "magnitude" (|τ|), "saliency" (v·τ²).
    """

    BINS = 4096

    def __init__(self, scores: Callable[[str, str], Iterable[tuple[str, Tensor]]], exact_limit: int = 1 << 26) -> None:
        super().__init__()
        self._scores = scores
        self._exact_limit = exact_limit

    def _compute(self, kind: str, expert: str, keep: float) -> GlobalCut:
        # One pass counts the scores, keeps them if they fit, and brackets the positive ones.
        chunks: list[tuple[str, Tensor]] | None = []
        total, positives, lo, hi = 0, 0, math.inf, -math.inf
        for name, s in self._scores(kind, expert):
            flat = s.reshape(-1)
            total += flat.numel()
            if total > self._exact_limit:
                chunks = None  # too many to hold: histogram instead
            if chunks is not None:
                chunks.append((name, flat))
            pos = flat[flat > 0]
            if pos.numel():
                positives += pos.numel()
                lo, hi = min(lo, float(pos.min())), max(hi, float(pos.max()))
        k = int(keep * total)
        if k <= 0:
            return KEEP_NONE
        if k >= total:
            return KEEP_ALL
        if chunks is not None:
            threshold = float(torch.cat([flat for _, flat in chunks]).kthvalue(total - k + 1).values)
            return global_cut(k, threshold, _counts(threshold, chunks))
        if k > positives:
            threshold = 0.0  # every positive score is kept, and the first zeros with them
        else:
            threshold = self._histogram_kth_largest(kind, expert, k, lo, hi)
        return global_cut(k, threshold, _counts(threshold, self._scores(kind, expert)))

    def _histogram_kth_largest(self, kind: str, expert: str, k: int, lo: float, hi: float) -> float:
        log_lo, width = math.log(lo), max(math.log(hi) - math.log(lo), 1e-30) / self.BINS

        def bins(pos: Tensor) -> Tensor:
            return ((pos.log() - log_lo) / width).long().clamp_(0, self.BINS - 1)

        counts = torch.zeros(self.BINS, dtype=torch.long)
        for _, s in self._scores(kind, expert):
            pos = s[s > 0]
            counts += torch.bincount(bins(pos), minlength=self.BINS)
        from_top = counts.flip(0).cumsum(0)
        target = int(self.BINS - 1 - int((from_top >= k).nonzero()[0]))
        above = int(counts[target + 1 :].sum())
        in_bin = []
        for _, s in self._scores(kind, expert):
            pos = s[s > 0]
            in_bin.append(pos[bins(pos) == target])
        bracket = torch.cat(in_bin)
        return float(bracket.kthvalue(bracket.numel() - (k - above) + 1).values)


def _counts(threshold: float, tensors: Iterable[tuple[str, Tensor]]) -> list[tuple[str, int, int]]:
    return [(name, int((s > threshold).sum()), int((s == threshold).sum())) for name, s in tensors]


def _ordered_bits(value: float) -> int:
    """A float32's bit pattern as an int that orders like the floats (negative floats flipped)."""
    bits = struct.unpack("<i", struct.pack("<f", value))[0]
    return bits if bits >= 0 else bits ^ 0x7FFFFFFF


def _ordered_float(key: int) -> float:
    return struct.unpack("<f", struct.pack("<i", key if key >= 0 else key ^ 0x7FFFFFFF))[0]


class SummaryThresholds(_Cached):
    """The same cuts from per-tensor order statistics: `orders(kind, expert)` yields (name, TensorOrder) in model order.

    The k-th largest score is found by bisecting on the float32 bit patterns of the scores, counting
    `count_at_least` per tensor: about 32 binary searches per tensor and cut.
    """

    def __init__(self, orders: Callable[[str, str], Iterable[tuple[str, TensorOrder]]]) -> None:
        super().__init__()
        self._orders = orders

    def _compute(self, kind: str, expert: str, keep: float) -> GlobalCut:
        orders = list(self._orders(kind, expert))
        total = sum(o.n for _, o in orders)
        k = int(keep * total)
        if k <= 0:
            return KEEP_NONE
        if k >= total:
            return KEEP_ALL

        def at_least(value: float) -> int:
            return sum(o.count_at_least(value) for _, o in orders)

        # The largest v with at_least(v) ≥ k is the k-th largest score.
        low = _ordered_bits(min(o.value(0) for _, o in orders if o.n))
        high = _ordered_bits(max(o.max_value() for _, o in orders))
        while low < high:
            mid = (low + high + 1) // 2
            if at_least(_ordered_float(mid)) >= k:
                low = mid
            else:
                high = mid - 1
        threshold = _ordered_float(low)
        counts = [(name, o.count_greater(threshold), o.count_at_least(threshold) - o.count_greater(threshold)) for name, o in orders]
        return global_cut(k, threshold, counts)


def tensor_scores(kind: str, tau: Tensor, moments: Tensor | None) -> Tensor | None:
    """One tensor's scores for a global threshold, as a fresh tensor: |τ| ("magnitude"), or v·τ² ("saliency";
    None when the tensor has no second moment)."""
    if kind == "saliency" and moments is None:
        return None
    return scores_of(kind, tau, moments)
