"""A selection's listed boundary entries, merged apart from the slice's kernel (on a CPU).

A `Selection` keeps the scores strictly between its bounds plus listed indices: the part of a
boundary run of equal scores that mergekit's tie order keeps (`order_stats`). The kernel can
read the listed entries as a full-size mark tensor per expert — made, faulted in and filled per
trial, then read with every entry (TIES on an AVX2 CPU: 2.6 ns per element with marks, 1.9
without, plus ~0.8 ns to make them). Where they are few (a few per ten thousand entries in the
bf16 checkpoints measured), a CPU merge instead runs the kernel on the bounds alone and then
merges the listed entries again — gathered, with 0/1 marks of their own, by the eager kernel —
over its result: the same elementwise IEEE operations per entry, so the same bytes
(tests/test_kernels.py finds eager and compiled kernels equal). A GPU keeps the marks: there
they are a memset and a byte read per entry, where a patch costs dozens of kernel launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mergetune.merge.kernels import l1_norm, task_vectors
from mergetune.merge.order_stats import Selection

# Listed entries up to this share of a slice are patched, more are marked. Measured on an AVX2 CPU, 3 experts: a
# patch costs ~350 µs per slice (its ~30 eager ops) plus ~200 ns per listed entry at 1K per expert, ~100 at 16K
# (gathers, scatter, eager merge); marks cost ~0.7 ns per slice entry and expert (made, then read by the kernel).
PATCH_MAX_SHARE = 1 / 256


def patches(device: torch.device, listed: int, count: int) -> bool:
    """Whether a slice of `count` entries on `device` merges its `listed` boundary entries apart (else: marks)."""
    return device.type == "cpu" and listed <= count * PATCH_MAX_SHARE


def sorted_union(arrays: list[np.ndarray]) -> np.ndarray:
    """The distinct values of integer arrays, ascending: a radix sort of them all, then each value that differs from
    the one before it. numpy's `unique` took 28× longer on three lists of 1,500 (hashing them: numpy 2.4)."""
    values = np.sort(np.concatenate(arrays), kind="stable")
    first = np.empty(values.size, dtype=bool)
    first[:1] = True
    np.not_equal(values[1:], values[:-1], out=first[1:])
    return values[first]


def union_marks(listed: list[Tensor | None]) -> tuple[Tensor | None, list[Tensor | None]]:
    """The sorted union of the experts' listed slice indices (each sorted int64 on the CPU, where patches run; None
    when none are listed), and per expert uint8 marks over it, 1 at its own (None: it lists none). In numpy: a
    dozen torch calls on a few thousand entries cost ~5× more in dispatch than the work."""
    present = [(k, t) for k, t in enumerate(listed) if t is not None]
    if not present:
        return None, [None] * len(listed)
    if len(present) == 1:
        k, at = present[0]
        return at, [torch.ones(at.numel(), dtype=torch.uint8) if j == k else None for j in range(len(listed))]
    arrays = [t.numpy() for _, t in present]
    union = sorted_union(arrays)
    marks = np.zeros((len(present), union.size), dtype=np.uint8)
    for row, own in zip(marks, arrays):
        row[np.searchsorted(union, own)] = 1
    row_of = {k: torch.from_numpy(marks[i]) for i, (k, _) in enumerate(present)}
    return torch.from_numpy(union), [row_of.get(j) for j in range(len(listed))]


def gathered(t: Tensor, at: Tensor) -> Tensor:
    """The entries `at` of a slice's tensor, flat."""
    return t.reshape(-1)[at]


def overwrite(result: Tensor, at: Tensor, merged: Tensor) -> Tensor:
    """`result` (a slice's merge, or its destination) with the entries `at` replaced by `merged`, rounded to its dtype
    as the kernel rounds what it stores."""
    result.view(-1)[at] = merged.to(result.dtype)
    return result


@dataclass
class Boundary:
    """How one slice's experts see their selections' listed entries."""

    kernel_marks: list[Tensor | None]  # per expert: the kernel's marks over the slice (None: none listed, or patched)
    at: Tensor | None  # the slice entries merged again after the kernel (None: no patch)
    patch_marks: list[Tensor | None]  # per expert: marks over `at` (its patched or marked listed entries there)
    patched: list[Tensor | None]  # per expert: its listed entries merged by the patch (None: none, or marked)


def boundary(selections: list[Selection | None], numel: int, offset: int, like: Tensor, mark_dtype: torch.dtype) -> Boundary:
    """Which experts' listed entries in the slice `like` (entries [offset, offset + like.numel()) of a tensor of `numel`)
    are patched, which marked for the kernel (`patches`; `mark_dtype`: `Kernels.mark_dtype`)."""
    count, device = like.numel(), like.device
    listed = [None if s is None else s.listed(device, offset, count) for s in selections]
    patched = [t if t is not None and patches(device, t.numel(), count) else None for t in listed]
    kernel_marks = [
        s.tied(numel, device, offset, count, mark_dtype).view(like.shape) if t is not None and p is None else None
        for s, t, p in zip(selections, listed, patched)
    ]
    at, marks = union_marks(patched)
    if at is None:
        return Boundary(kernel_marks, None, [], patched)
    patch_marks = [own if kernel is None else gathered(kernel, at) for own, kernel in zip(marks, kernel_marks)]
    return Boundary(kernel_marks, at, patch_marks, patched)


def patched_l1(base: Tensor, given: Tensor, stored: bool, at: Tensor) -> Tensor:
    """Σ|τ| (float64) over the entries `at` of one expert's slice: what a patched selection keeps beyond its bounds."""
    return l1_norm(task_vectors(gathered(base, at), [gathered(given, at)], stored)[1][0])
