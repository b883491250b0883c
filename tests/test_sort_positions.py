"""`SortPositions` keeps exactly the entries `torch.sort` puts at a range of positions, without sorting.

The reference is `sparsify.position_mask` (torch's CPU sort: mergekit's tie order). Checked by
hypothesis on fp32 scores, bf16-valued |τ| (long runs of equal values), few distinct values and
zeros, for position ranges of both directions; on tensors large enough for many partition steps
(and the block-paired partition); and on the paths that fall back to the sort.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_order_stats import KINDS, scores_of_kind

from mergetune.merge import sort_positions
from mergetune.merge.methods.registry import InputSummaries
from mergetune.merge.sort_positions import SortPositions, emulates_torch_sort, followed
from mergetune.merge.sparsify import position_mask

torch.set_num_threads(1)
PROPERTY = settings(max_examples=80, deadline=None)


def test_the_emulation_matches_this_torch():
    assert emulates_torch_sort()


def test_the_self_check_refuses_an_emulation_that_differs(monkeypatch):
    unsorted = lambda scores, direction, cuts: (scores.clone(), torch.arange(scores.numel(), dtype=torch.int32))  # noqa: E731
    monkeypatch.setattr(sort_positions, "followed", unsorted)
    emulates_torch_sort.cache_clear()
    try:
        assert not emulates_torch_sort()
    finally:
        emulates_torch_sort.cache_clear()


@PROPERTY
@given(
    n=st.sampled_from([1, 2, 3, 16, 17, 33, 257, 1000, 3001, 20000]),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_selections_equal_the_sort_reference(n, kind, seed, data):
    scores = scores_of_kind(kind, n, seed)
    order = SortPositions(scores)
    for direction in ("desc", "asc"):
        for _ in range(3):
            start = data.draw(st.integers(0, n))
            stop = data.draw(st.integers(start, n))
            want = position_mask(scores, start, stop, descending=direction == "desc")
            assert torch.equal(order.select(direction, start, stop).mask(scores), want)
    k = data.draw(st.integers(0, n))
    assert torch.equal(order.top(k).mask(scores), position_mask(scores, 0, k, descending=True))


@pytest.mark.parametrize("kind", ["bf16", "fp32", "few"])
def test_large_tensors_keep_the_sorts_entries_at_every_cut(kind):
    """1.5M entries: ~20 partition levels of blocks; the cuts of a TIES trim at several densities."""
    scores = scores_of_kind(kind, 1_500_000, 11)
    reference = torch.sort(scores, descending=True).indices
    cuts = [1, 150_000, 750_000, 1_499_999]
    vals, idx = followed(scores, "desc", cuts)
    for c in cuts:
        want = torch.zeros(scores.numel(), dtype=torch.bool)
        want[reference[:c]] = True
        got = torch.zeros_like(want)
        got[idx[:c].long()] = True
        assert torch.equal(got, want)
        assert torch.equal(vals[:c].sort().values, scores[reference[:c]].sort().values)


def test_nan_scores_take_the_sort():
    scores = torch.tensor([0.5, float("nan"), 0.5, 0.2, 0.5, float("nan"), 0.1] * 5)
    got = SortPositions(scores).select("desc", 3, 17).mask(scores)
    assert torch.equal(got, position_mask(scores, 3, 17, descending=True))


def test_the_depth_limit_gives_up_and_the_sort_answers(monkeypatch):
    """Where std::sort would heapsort a segment (its depth limit), the emulation says so, and `select` sorts."""
    scores = scores_of_kind("bf16", 5000, 3)
    cuts = np.array([2500])
    for limit, done in ((1, False), (24, True)):
        vals, idx = scores.clone(), torch.arange(5000, dtype=torch.int32)
        assert sort_positions._follow_cuts(vals.numpy(), idx.numpy(), cuts, True, limit) is done
    monkeypatch.setattr(sort_positions, "followed", lambda *args: None)
    got = SortPositions(scores).select("desc", 100, 2500).mask(scores)
    assert torch.equal(got, position_mask(scores, 100, 2500, descending=True))


def test_input_summaries_select_in_sort_order():
    gen = torch.Generator().manual_seed(3)
    deltas = [(0.02 * torch.randn(300, 40, generator=gen)).bfloat16().float() for _ in range(3)]
    summaries = InputSummaries(deltas, None)
    for m in range(3):
        for direction in ("desc", "asc"):
            want = position_mask(deltas[m].abs(), 100, 7000, descending=direction == "desc")
            assert torch.equal(summaries.order("magnitude", m, direction).select(direction, 100, 7000).mask(deltas[m].abs()), want)
