"""The entries `torch.sort` puts at a range of positions of one tensor's scores, found without sorting.

A TIES trim keeps the top-k |τ| in `torch.sort`'s order (mergekit does; `sparsify.sort_positions`),
and among equal scores — bf16 task vectors have runs of thousands — that order is an artifact
of the sort: on a CPU, libstdc++'s introsort over (value, index) pairs. A one-shot merge needs
only which entries land before a cut, not the whole order, so `SortPositions` runs the same
introsort steps (median-of-3 pivot, unguarded Hoare partition, insertion sort below 16 entries)
on just the segments that hold a cut: O(n) expected instead of O(n log n), measured 5–7×
faster than the sort on 1.5M–59M bf16-valued entries (one thread). The same entries, bit for
bit: `emulates_torch_sort` checks it on this machine's torch before it is trusted, and NaN
scores or introsort's rare heapsort fallback (its depth limit) take the sort itself.

Written by hand (numba-compiled loops) because no library offers a partial std::sort with its tie order.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch
from numba import njit
from torch import Tensor

from mergetune.merge.order_stats import Selection, TensorOrder

log = logging.getLogger(__name__)

INSERTION_THRESHOLD = 16  # libstdc++'s _S_threshold: segments this small are left to the final insertion sort
BLOCK = 128  # entries scanned per side before swapping (a partition's swaps, found without branches)


@njit(inline="always")
def _before(a, b, descending):
    """Whether a sorts strictly before b (torch's comparator on non-NaN values)."""
    return a > b if descending else a < b


@njit(inline="always")
def _swap(vals, idx, i, j):
    vals[i], vals[j] = vals[j], vals[i]
    idx[i], idx[j] = idx[j], idx[i]


@njit(inline="always")
def _holds_cut(cuts, first, last):
    """Whether a cut lies strictly inside [first, last) (`cuts` ascending)."""
    j = np.searchsorted(cuts, first, side="right")
    return j < cuts.shape[0] and cuts[j] < last


@njit(inline="always")
def _median_to_first(vals, idx, first, a, b, c, descending):
    """libstdc++ __move_median_to_first."""
    if _before(vals[a], vals[b], descending):
        if _before(vals[b], vals[c], descending):
            _swap(vals, idx, first, b)
        elif _before(vals[a], vals[c], descending):
            _swap(vals, idx, first, c)
        else:
            _swap(vals, idx, first, a)
    elif _before(vals[a], vals[c], descending):
        _swap(vals, idx, first, a)
    elif _before(vals[b], vals[c], descending):
        _swap(vals, idx, first, c)
    else:
        _swap(vals, idx, first, b)


@njit(nogil=True, cache=True)
def _partition(vals, idx, first, last, descending, left_stops, right_stops):
    """libstdc++ __unguarded_partition(first + 1, last, pivot = first), same swaps: the i-th entry from the left
    that does not sort before the pivot trades places with the i-th from the right the pivot does not sort
    before, while they have not crossed. Blocks of such stops are found without branches and paired; the last
    stretch (under two blocks) runs the scalar loop from the state after the last pair."""
    pivot = vals[first]
    lo, hi = first + 1, last  # not yet scanned: [lo, hi)
    n_left = used_left = n_right = used_right = 0
    left, right = first + 1, last  # the scalar loop's pointers after the pairs swapped so far
    while True:
        if used_left == n_left:
            if hi - lo < BLOCK:
                break
            n_left = used_left = 0
            for i in range(BLOCK):
                left_stops[n_left] = lo + i
                n_left += not _before(vals[lo + i], pivot, descending)
            lo += BLOCK
        if used_right == n_right:
            if hi - lo < BLOCK:
                break
            n_right = used_right = 0
            for i in range(BLOCK):
                right_stops[n_right] = hi - 1 - i
                n_right += not _before(pivot, vals[hi - 1 - i], descending)
            hi -= BLOCK
        pairs = min(n_left - used_left, n_right - used_right)
        for u in range(pairs):
            _swap(vals, idx, left_stops[used_left + u], right_stops[used_right + u])
        if pairs:
            left, right = left_stops[used_left + pairs - 1] + 1, right_stops[used_right + pairs - 1]
        used_left += pairs
        used_right += pairs
    while True:
        while _before(vals[left], pivot, descending):
            left += 1
        right -= 1
        while _before(pivot, vals[right], descending):
            right -= 1
        if not left < right:
            return left
        _swap(vals, idx, left, right)
        left += 1


@njit(nogil=True, cache=True)
def _follow_cuts(vals, idx, cuts, descending, depth_limit):
    """Run std::sort's introsort on (vals, idx) in place, but only on segments holding a cut, so that afterwards
    positions [0, c) hold exactly the entries the full sort puts there, for every cut c. False: a followed
    segment hit `depth_limit` partitions deep (where std::sort heapsorts), and the arrays are not usable."""
    n = vals.shape[0]
    if n < 2:
        return True
    left_stops = np.empty(BLOCK, dtype=np.int64)
    right_stops = np.empty(BLOCK, dtype=np.int64)
    stack = np.empty((depth_limit * (cuts.shape[0] + 1) + 8, 3), dtype=np.int64)
    stack[0, 0], stack[0, 1], stack[0, 2] = 0, n, depth_limit
    top = 1
    while top > 0:
        top -= 1
        first, last, depth = stack[top, 0], stack[top, 1], stack[top, 2]
        while last - first > INSERTION_THRESHOLD and _holds_cut(cuts, first, last):
            if depth == 0:
                return False
            depth -= 1
            _median_to_first(vals, idx, first, first + 1, first + (last - first) // 2, last - 1, descending)
            cut = _partition(vals, idx, first, last, descending, left_stops, right_stops)
            if _holds_cut(cuts, cut, last):  # std::sort recurses on the right part, loops on the left
                stack[top, 0], stack[top, 1], stack[top, 2] = cut, last, depth
                top += 1
            last = cut
        if last - first <= INSERTION_THRESHOLD and _holds_cut(cuts, first, last):
            # The final insertion sort: stable, and no entry crosses a partition boundary.
            for i in range(first + 1, last):
                v, w = vals[i], idx[i]
                j = i
                while j > first and _before(v, vals[j - 1], descending):
                    vals[j], idx[j] = vals[j - 1], idx[j - 1]
                    j -= 1
                vals[j], idx[j] = v, w
    return True


@njit(nogil=True, cache=True)
def _iota(idx):
    """idx[i] = i (torch's int32 arange costs 1.8 ns an entry on one CPU thread; in a disk TIES merge this took 0.23 s
    where arange took 0.35 s, the rest being page faults of the fresh index)."""
    for i in range(idx.shape[0]):
        idx[i] = i


def followed(scores: Tensor, direction: str, cuts: list[int]) -> tuple[Tensor, Tensor] | None:
    """(values, flat indices) rearranged so that positions [0, c) hold what `torch.sort(scores, descending=...)`
    puts there, for each cut c; None where only the sort can tell (a heapsorted segment)."""
    vals = scores.detach().reshape(-1).to("cpu", torch.float32, copy=True)
    idx = torch.empty(vals.numel(), dtype=torch.int32)
    _iota(idx.numpy())
    inside = np.array(sorted({c for c in cuts if 0 < c < vals.numel()}), dtype=np.int64)
    depth_limit = 2 * max(vals.numel().bit_length() - 1, 0)  # 2·⌊log2 n⌋, as std::sort
    if not _follow_cuts(vals.numpy(), idx.numpy(), inside, direction == "desc", depth_limit):
        return None
    return vals, idx


@functools.cache
def emulates_torch_sort() -> bool:
    """Whether `followed` reproduces this torch's CPU sort (libstdc++'s introsort): checked once per process
    on tie-heavy and distinct scores, both directions, several cuts; where not, the sort itself is used."""
    gen = torch.Generator().manual_seed(0)
    for n, levels in ((5000, 7), (3000, 0), (40, 3), (17, 2)):
        scores = torch.randint(0, levels, (n,), generator=gen).float() if levels else torch.rand(n, generator=gen)
        cuts = [1, n // 3, n // 2, n - 1]
        for direction in ("desc", "asc"):
            reference = torch.sort(scores, descending=direction == "desc").indices
            found = followed(scores, direction, cuts)
            if found is None or any(set(found[1][:c].tolist()) != set(reference[:c].tolist()) for c in cuts):
                log.warning("this torch's CPU sort is not the introsort sort_positions follows; selections will sort (slower)")
                return False
    return True


class SortPositions:
    """One tensor's scores, answering which entries lie at sort positions [start, stop) (`select`, `top`) and
    how many exceed a value — the part of `order_stats.TensorOrder` a merge that selects once per tensor reads.
    Each selection follows its range's ends afresh (a copy of the scores and an int32 index: 8 bytes an entry)."""

    def __init__(self, scores: Tensor) -> None:
        self.scores = scores.detach().reshape(-1).to("cpu", torch.float32)
        self.n = self.scores.numel()
        # No NaN where the sum is not NaN (a NaN sum — NaN, or +inf with -inf — takes the sort): one pass, 14× cheaper
        # than isnan().any()
        self._followable = not math.isnan(float(self.scores.sum()))

    def count_greater(self, value: float) -> int:
        return int((self.scores > value).sum())

    def top(self, k: int) -> Selection:
        """The k largest scores (descending positions [0, k))."""
        return self.select("desc", 0, k)

    def select(self, direction: str, start: int, stop: int) -> Selection:
        """The entries at positions [start, stop) of `direction`'s sort order, as `TensorOrder.select` gives them."""
        start, stop = max(start, 0), min(stop, self.n)
        if stop <= start:
            return Selection.nothing()
        if start == 0 and stop == self.n:
            return Selection.everything()
        found = followed(self.scores, direction, [start, stop]) if self._followable and emulates_torch_sort() else None
        if found is None:
            return TensorOrder.sorted(self.scores, direction).select(direction, start, stop)
        vals, idx = found
        kept, kept_idx = vals[start:stop], idx[start:stop]
        low, high = float(kept.min()), float(kept.max())
        # Positions before `start` hold the scores that sort first, those from `stop` on the rest (as sets): the
        # outside entries ≥ the range's largest on one side, ≤ its smallest on the other. A boundary value's run
        # lies wholly in the range iff no outside entry on its side has the value.
        above, below = (vals[:start], vals[stop:]) if direction == "desc" else (vals[stop:], vals[:start])
        high_whole = not bool((above == high).any())
        low_whole = not bool((below == low).any())
        if low == high:
            if low_whole and high_whole:
                return Selection.bounded(low, True, high, True, [])
            return Selection.bounded(low, False, high, False, [kept_idx.clone()])  # not a view holding all of idx
        indices = [kept_idx[kept == value] for value, whole in ((low, low_whole), (high, high_whole)) if not whole]
        if low_whole and below.numel() == 0:
            low = -math.inf  # the smallest scores, whole: no lower bound to compare
        if high_whole and above.numel() == 0:
            high = math.inf
        return Selection.bounded(low, low_whole, high, high_whole, indices)
