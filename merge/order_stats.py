"""Order statistics of one tensor's scores, computed once, so a trial's exact top-k or band needs no sort.

Task vectors never change within a study, so neither do their scores (|τ|, v·τ²) nor the
order `sparsify.sort_positions` puts them in. `TensorOrder.build` runs that very sort once
and keeps what any later selection of positions [start, stop) needs:

- the sorted values, as runs of equal values (value, cumulative count) when there are few
  distinct values (bf16 checkpoints), else every value in ascending order (fp32);
- for each sort direction, the tie order: the flat index at every position that lies in a run
  of equal values (two or more entries), in that direction's sort order — the only part of the
  order the values themselves do not decide.

`select` turns positions [start, stop) of a direction into a `Selection`: keep the scores
strictly between the two boundary values, the boundary runs' entries whole when the range
covers them, else the listed indices of the part it covers. Its mask equals
`sparsify.position_mask` bit for bit, and costs one compare pass plus a scatter of the
boundary indices. Build time is the sort's; storage is 4 bytes per entry for the values or the
tie order of a direction, whichever the data need (see `nbytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mergetune.merge.kernels import within

Direction = Literal["desc", "asc"]
DIRECTIONS: tuple[str, ...] = ("desc", "asc")


def _search(sorted_values: Tensor, value: float, right: bool) -> int:
    """Where `value` (as the array's dtype) goes in a sorted CPU array: numpy's search of its zero-copy view, a
    microsecond where torch's costs ~10 (a trial runs a dozen per tensor and expert)."""
    array = sorted_values.numpy()
    return int(np.searchsorted(array, array.dtype.type(value), side="right" if right else "left"))


@dataclass
class TensorOrder:
    """One tensor's scores in `sort_positions` order, compressed (see the module docstring). CPU tensors."""

    n: int
    run_values: Tensor | None  # float32[R], ascending (runs layout)
    run_ends: Tensor | None  # int64[R], cumulative counts (runs layout)
    values: Tensor | None  # float32[n], ascending (dense layout)
    ties: dict[str, tuple[Tensor | None, Tensor]] = field(default_factory=dict)
    # direction → (positions in that order of the entries in tied runs (None: every position), their flat indices)

    @classmethod
    def build(cls, scores: Tensor, directions: tuple[str, ...] = ("desc",)) -> TensorOrder:
        """Sort the flattened float32 scores on the CPU once per direction (the `sort_positions` sort)."""
        flat = scores.detach().reshape(-1).to("cpu", torch.float32)
        n = flat.numel()
        order = cls(n, None, None, None)
        sorts = {d: torch.sort(flat, descending=d == "desc") for d in directions}
        first = sorts[directions[0]]
        ascending = first.values if directions[0] == "asc" else first.values.flip(0)
        run_values, counts = torch.unique_consecutive(ascending, return_counts=True)
        tied_entries = int(counts[counts > 1].sum())
        runs_bytes = 12 * run_values.numel() + 4 * n * len(directions)
        dense_bytes = 4 * n + 8 * tied_entries * len(directions)
        if runs_bytes < dense_bytes:
            order.run_values, order.run_ends = run_values, counts.cumsum(0)
        else:
            order.values = ascending.clone()
        for d, (_, indices) in sorts.items():
            order._add_ties(d, counts, indices)
        return order

    @classmethod
    def sorted(cls, scores: Tensor, direction: str = "desc") -> TensorOrder:
        """The same order from one sort, uncompressed: every value and the whole tie order as `torch.sort` gives
        it (8 bytes an entry) — where `sort_positions.SortPositions`, which finds a one-shot selection without
        sorting, cannot (NaN scores, introsort's depth limit)."""
        flat = scores.detach().reshape(-1).to("cpu", torch.float32)
        values, indices = torch.sort(flat, descending=direction == "desc")
        ascending = values if direction == "asc" else values.flip(0)
        return cls(flat.numel(), None, None, ascending, {direction: (None, indices.to(torch.int32))})

    def _add_ties(self, direction: str, counts: Tensor, indices: Tensor) -> None:
        if self.values is None:
            self.ties[direction] = (None, indices.to(torch.int32))
            return
        # Positions (in this direction's order) of entries whose run has more than one entry.
        run_tied = counts > 1 if direction == "asc" else (counts > 1).flip(0)
        run_counts = counts if direction == "asc" else counts.flip(0)
        tied = torch.repeat_interleave(run_tied, run_counts)
        positions = tied.nonzero().reshape(-1)
        self.ties[direction] = (positions.to(torch.int32), indices[positions].to(torch.int32))

    def add_direction(self, scores: Tensor, direction: str) -> None:
        """The tie order of one more direction, from the same scores."""
        flat = scores.detach().reshape(-1).to("cpu", torch.float32)
        indices = torch.sort(flat, descending=direction == "desc").indices
        if self.values is None:
            counts = torch.diff(self.run_ends, prepend=torch.zeros(1, dtype=self.run_ends.dtype))
        else:
            counts = torch.unique_consecutive(self.values, return_counts=True)[1]
        self._add_ties(direction, counts, indices)

    # --- lookups (positions in ascending value order, "asc positions") ---
    def value(self, asc_position: int) -> float:
        if self.values is not None:
            return float(self.values.numpy()[asc_position])
        return float(self.run_values.numpy()[_search(self.run_ends, asc_position, right=True)])

    def run(self, asc_position: int) -> tuple[int, int]:
        """[first, stop) asc positions of the run of equal values holding `asc_position`."""
        if self.values is not None:
            v = float(self.values.numpy()[asc_position])
            return _search(self.values, v, right=False), _search(self.values, v, right=True)
        r = _search(self.run_ends, asc_position, right=True)
        ends = self.run_ends.numpy()
        return (int(ends[r - 1]) if r else 0), int(ends[r])

    def count_at_least(self, value: float) -> int:
        """How many scores are ≥ value."""
        if self.values is not None:
            return self.n - _search(self.values, value, right=False)
        r = _search(self.run_values, value, right=False)
        return self.n - (int(self.run_ends.numpy()[r - 1]) if r else 0)

    def count_greater(self, value: float) -> int:
        if self.values is not None:
            return self.n - _search(self.values, value, right=True)
        r = _search(self.run_values, value, right=True)
        return self.n - (int(self.run_ends.numpy()[r - 1]) if r else 0)

    def max_value(self) -> float:
        return self.value(self.n - 1) if self.n else -math.inf

    def tie_indices(self, direction: str, start: int, stop: int) -> Tensor:
        """Flat indices at positions [start, stop) of `direction`'s order, a range inside one tied run."""
        positions, indices = self.ties[direction]
        if positions is None:
            return indices[start:stop]
        j = _search(positions, start, right=False)
        return indices[j : j + stop - start]

    # --- selections ---
    def select(self, direction: str, start: int, stop: int) -> Selection:
        """The entries at positions [start, stop) of `direction`'s sort order (see `Selection`)."""
        n = self.n
        start, stop = max(start, 0), min(stop, n)
        if stop <= start:
            return Selection.nothing()
        if start == 0 and stop == n:
            return Selection.everything()
        # The kept values span asc positions [lo, hi] (desc position p holds asc value position n-1-p).
        lo, hi = (start, stop - 1) if direction == "asc" else (n - stop, n - 1 - start)
        lo_run, hi_run = self.run(lo), self.run(hi)
        indices = []

        def covered(run: tuple[int, int]) -> tuple[bool, tuple[int, int]]:
            """Whether [start, stop) covers the run, and the part of the run's span (in `direction`) it covers."""
            first, last = run if direction == "asc" else (n - run[1], n - run[0])
            part = max(first, start), min(last, stop)
            return part == (first, last), part

        if lo_run == hi_run:
            whole, part = covered(lo_run)
            if not whole:
                return Selection.bounded(self.value(lo), False, self.value(lo), False, [self.tie_indices(direction, *part)])
            return Selection.bounded(self.value(lo), True, self.value(lo), True, [])
        bounds = []
        for run, at in ((lo_run, lo), (hi_run, hi)):
            whole, part = covered(run)
            if not whole:
                indices.append(self.tie_indices(direction, *part))
            bounds.append((self.value(at), whole))
        (low, low_whole), (high, high_whole) = bounds
        if low_whole and lo_run[0] == 0:
            low = -math.inf  # the smallest run, whole: no lower bound to compare
        if high_whole and hi_run[1] == n:
            high = math.inf
        return Selection.bounded(low, low_whole, high, high_whole, indices)

    def top(self, k: int) -> Selection:
        """The k largest scores (descending positions [0, k))."""
        return self.select("desc", 0, k)

    # --- storage ---
    def to_tensors(self) -> dict[str, Tensor]:
        """Its arrays by field name (for a safetensors file; `from_tensors` reads them back)."""
        out = {}
        if self.values is not None:
            out["values"] = self.values
        else:
            out["run_values"], out["run_ends"] = self.run_values, self.run_ends
        for direction, (positions, indices) in self.ties.items():
            if positions is not None:
                out[f"{direction}.positions"] = positions
            out[f"{direction}.indices"] = indices
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> TensorOrder:
        values = tensors.get("values")
        run_ends = tensors.get("run_ends")
        if values is not None:
            n = values.numel()
        else:
            n = int(run_ends[-1]) if run_ends.numel() else 0
        ties = {d: (tensors.get(f"{d}.positions"), tensors[f"{d}.indices"]) for d in DIRECTIONS if f"{d}.indices" in tensors}
        return cls(n, tensors.get("run_values"), run_ends, values, ties)

    @property
    def nbytes(self) -> int:
        tensors = [self.run_values, self.run_ends, self.values] + [t for pair in self.ties.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _next_float(value: float, toward: float) -> float:
    """The float32 next to `value` toward `toward` (±inf stays)."""
    if math.isinf(value):
        return value
    return float(np.nextafter(np.float32(value), np.float32(toward)))


@dataclass
class Selection:
    """Which entries of a tensor's scores are kept: those strictly between two float32 bounds, plus listed indices.

    Kept: low < s < high (an inclusive boundary — the range covers that boundary's run of equal
    values whole — is the next float outward), and the entries at `indices` (the covered part of
    a boundary run, in the sort's tie order). `everything()` / `nothing()` keep all / none.
    """

    low: float
    high: float
    indices: list[Tensor]
    _tied: dict[tuple[torch.device, torch.dtype], Tensor] = field(default_factory=dict, repr=False)
    _sorted: dict[torch.device, Tensor] = field(default_factory=dict, repr=False)
    _stop: dict[torch.device, int] = field(default_factory=dict, repr=False)  # one past the largest listed index

    @classmethod
    def bounded(cls, low: float, low_inclusive: bool, high: float, high_inclusive: bool, indices: list[Tensor]) -> Selection:
        low = _next_float(low, -math.inf) if low_inclusive else low
        high = _next_float(high, math.inf) if high_inclusive else high
        return cls(low, high, indices)

    @classmethod
    def everything(cls) -> Selection:
        return cls(-math.inf, math.inf, [])

    @classmethod
    def nothing(cls) -> Selection:
        return cls(math.inf, -math.inf, [])

    @property
    def count_listed(self) -> int:
        return sum(t.numel() for t in self.indices)

    def tied(
        self, numel: int, device: torch.device, offset: int = 0, count: int | None = None, dtype: torch.dtype = torch.uint8
    ) -> Tensor | None:
        """Entries [offset, offset + count) of a tensor of the whole tensor's size (uint8, or the `dtype` a kernel
        reads, `Kernels.mark_dtype`), 1 at the listed indices (made once per device); None when none are listed."""
        if not self.indices:
            return None
        if (device, dtype) not in self._tied:
            out = torch.zeros(numel, dtype=dtype, device=device)
            for t in self.indices:
                out[t.to(device=device, dtype=torch.int64)] = 1
            self._tied[(device, dtype)] = out
        return self._tied[(device, dtype)][offset : offset + (numel if count is None else count)]

    def bounds(self) -> tuple[float | None, float | None]:
        """(low, high) as a kernel compares them (`kernels.within`): None where a bound excludes no number (−inf below,
        +inf above; an infinite score in the top run is kept, as the reference's sort ranks it first)."""
        return (None if self.low == -math.inf else self.low), (None if self.high == math.inf else self.high)

    def listed(self, device: torch.device, offset: int, count: int) -> Tensor | None:
        """The listed indices in entries [offset, offset + count), less `offset`: sorted int64 on `device` (all of
        them sorted once per device); None when there are none."""
        if not self.indices:
            return None
        if device not in self._sorted:
            self._sorted[device] = torch.cat(self.indices).to(device=device, dtype=torch.int64).sort().values
            self._stop[device] = int(self._sorted[device][-1]) + 1
        flat = self._sorted[device]
        if offset == 0 and count >= self._stop[device]:
            return flat  # the whole tensor's slice (most tensors are one)
        first, stop = torch.searchsorted(flat, torch.tensor([offset, offset + count], device=device)).tolist()
        return flat[first:stop] - offset if stop > first else None

    def mask(self, scores: Tensor, offset: int = 0) -> Tensor:
        """The keep-mask of `scores`: elements [offset, offset + scores.numel()) of the whole tensor."""
        keep = within(scores, *self.bounds())
        keep = torch.ones_like(scores, dtype=torch.bool) if keep is None else keep
        listed = self.listed(scores.device, offset, scores.numel())
        if listed is not None:
            keep.view(-1)[listed] = True
        return keep


def row_ranks(tau: Tensor) -> Tensor:
    """Each entry's rank by |τ| within its row (first axis; a 1-D tensor is one row), 0 = smallest, ties in index
    order (a stable sort: the same on every device). int16 when rows are shorter than 2^15, else int32."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    dtype = torch.int16 if n < (1 << 15) else torch.int32
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order, dtype=dtype)
    ranks.scatter_(1, order, torch.arange(n, dtype=dtype, device=tau.device).expand_as(order))
    return ranks.reshape(tau.shape)
