"""Global cuts: per expert, which entries of all its tensors a global top-k keeps (exactly k of them).

The seam for precomputed order statistics: `GlobalThresholds` asks a `scores(kind, expert)`
callable for every tensor's (name, scores) and caches each (kind, expert, keep) answer for the
whole study, since task vectors never change within one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from mergetune.merge.sparsify import KEEP_ALL, KEEP_NONE, GlobalCut, global_cut

log = logging.getLogger(__name__)


class GlobalThresholds:
    """Per-expert global top-k cuts over all of the expert's tensors (`sparsify.GlobalCut`), cached.

    The cut for keep fraction ρ keeps exactly k = ⌊ρN⌋ entries: its threshold is the k-th largest
    score — exact `kthvalue` when the scores fit in `exact_limit` elements, else a histogram of
    log-scores and an exact pass over the bracketing bin — and one more pass counts the entries
    equal to it per tensor, which are kept in tensor order. Kinds: "magnitude" (|τ|), "saliency" (v·τ²).
    """

    BINS = 4096

    def __init__(self, scores: Callable[[str, str], Iterable[tuple[str, Tensor]]], exact_limit: int = 1 << 26) -> None:
        self._scores = scores
        self._exact_limit = exact_limit
        self._cache: dict[tuple[str, str, float], GlobalCut] = {}

    def __call__(self, kind: str, expert: str, keep: float) -> GlobalCut:
        key = (kind, expert, float(keep))
        if key not in self._cache:
            started = time.perf_counter()
            self._cache[key] = self._compute(kind, expert, float(keep))
            log.debug("global %s cut of %s at %.3f: %.3g (%.2fs)", kind, expert, keep, self._cache[key].threshold, time.perf_counter() - started)
        return self._cache[key]

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
            return global_cut(k, threshold, chunks)
        if k > positives:
            threshold = 0.0  # every positive score is kept, and the first zeros with them
        else:
            threshold = self._histogram_kth_largest(kind, expert, k, lo, hi)
        return global_cut(k, threshold, self._scores(kind, expert))

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


def tensor_scores(kind: str, tau: Tensor, moments: Tensor | None) -> Tensor | None:
    """One tensor's scores for a global threshold, as a fresh tensor: |τ| ("magnitude"), or v·τ² ("saliency";
    None when the tensor has no second moment)."""
    if kind == "magnitude":
        return tau.abs()
    return None if moments is None else moments * tau.square()
