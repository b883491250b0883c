"""Order statistics computed once per tensor give the masks of the sort-based reference, bit for bit.

The reference is `sparsify.sort_positions` (mergekit's tie order): positions in torch's CPU sort
of the scores. Checked by hypothesis on fp32 scores, bf16-valued ones (huge runs of equal
magnitudes), few distinct values and zeros, for every position range of both sort orders, per
tensor and over several tensors (global cuts), on whole tensors and on slices.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergetune.merge.order_stats import TensorOrder, row_ranks
from mergetune.merge.sparsify import global_cut, position_mask, sort_positions
from mergetune.merge.thresholds import GlobalThresholds, SummaryThresholds

torch.set_num_threads(1)
PROPERTY = settings(max_examples=60, deadline=None)
KINDS = ("fp32", "bf16", "few", "zeros", "mixed")


def scores_of_kind(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "fp32":
        return torch.randn(n, generator=gen).abs()
    if kind == "bf16":  # |θ_k − θ₀| of bf16 weights: multiples of a few ulps, many exact zeros
        base = (0.02 * torch.randn(n, generator=gen)).bfloat16()
        expert = (base.float() + 2e-4 * torch.randn(n, generator=gen)).bfloat16()
        return (expert.float() - base.float()).abs()
    if kind == "few":
        return torch.randint(0, 4, (n,), generator=gen).float()
    if kind == "zeros":
        return torch.zeros(n)
    return torch.where(torch.rand(n, generator=gen) < 0.5, torch.randn(n, generator=gen).abs(), torch.ones(n))


sizes = st.sampled_from([1, 2, 3, 16, 17, 40, 257, 1000, 3001])
kinds = st.sampled_from(KINDS)
seeds = st.integers(0, 2**31 - 1)


@PROPERTY
@given(n=sizes, kind=kinds, seed=seeds, data=st.data(), both=st.booleans(), one_shot=st.booleans())
def test_selections_equal_the_sort_positions_reference(n, kind, seed, data, both, one_shot):
    scores = scores_of_kind(kind, n, seed)
    first = data.draw(st.sampled_from(["desc", "asc"]))
    directions = ("desc", "asc") if both else (first,)
    if one_shot:  # the disk engine's uncompressed order, a second direction added later
        order = TensorOrder.sorted(scores, directions[0])
        for direction in directions[1:]:
            order.add_direction(scores, direction)
    else:
        order = TensorOrder.build(scores, directions)
    for direction in directions:
        descending = direction == "desc"
        for _ in range(4):
            start = data.draw(st.integers(0, n))
            stop = data.draw(st.integers(start, n))
            want = position_mask(scores, start, stop, descending=descending)
            assert torch.equal(order.select(direction, start, stop).mask(scores), want)
    if "desc" in directions:
        assert torch.equal(order.top(n // 3).mask(scores), position_mask(scores, 0, n // 3, descending=True))


@PROPERTY
@given(n=sizes, kind=kinds, seed=seeds, start=st.floats(0, 1), width=st.floats(0, 1), chunk=st.integers(1, 700))
def test_masks_of_slices_are_slices_of_the_whole_mask(n, kind, seed, start, width, chunk):
    scores = scores_of_kind(kind, n, seed).reshape(-1)
    a = int(start * n)
    b = min(n, a + int(width * n))
    selection = TensorOrder.build(scores, ("asc",)).select("asc", a, b)
    whole = selection.mask(scores)
    parts = [selection.mask(scores[i : i + chunk], offset=i) for i in range(0, n, chunk)]
    assert torch.equal(torch.cat(parts) if parts else whole, whole)


@pytest.mark.parametrize("kind", KINDS)
def test_a_direction_added_later_and_a_stored_copy_select_the_same(kind):
    scores = scores_of_kind(kind, 5000, 1).reshape(50, 100)
    order = TensorOrder.build(scores, ("desc",))
    order.add_direction(scores, "asc")
    stored = TensorOrder.from_tensors({k: v.clone() for k, v in order.to_tensors().items()})
    for direction, start, stop in [("desc", 0, 1234), ("asc", 700, 4100), ("asc", 0, 5000), ("desc", 2500, 2501)]:
        want = position_mask(scores, start, stop, descending=direction == "desc")
        assert torch.equal(order.select(direction, start, stop).mask(scores), want)
        assert torch.equal(stored.select(direction, start, stop).mask(scores), want)


def test_bytes_per_entry_are_about_four_per_direction():
    fp32, bf16 = scores_of_kind("fp32", 100_000, 0), scores_of_kind("bf16", 100_000, 0)
    assert TensorOrder.build(fp32).nbytes / fp32.numel() < 4.1  # every value, hardly any ties
    assert TensorOrder.build(bf16).nbytes / bf16.numel() < 4.2  # runs of equal values, their tie order
    assert TensorOrder.build(bf16, ("desc", "asc")).nbytes / bf16.numel() < 8.2
    assert TensorOrder.build(bf16).run_values is not None and TensorOrder.build(fp32).values is not None


def global_reference(tensors: list[tuple[str, torch.Tensor]], keep: float) -> dict[str, torch.Tensor]:
    """Exactly ⌊ρN⌋ entries: above the k-th largest, then those equal to it in tensor order and, within a tensor,
    in its `sort_positions` order — by brute force over one concatenated sort."""
    flat = torch.cat([s.reshape(-1) for _, s in tensors])
    k = int(keep * flat.numel())
    out = {}
    if k <= 0:
        return {name: torch.zeros_like(s, dtype=torch.bool) for name, s in tensors}
    threshold = float(flat.sort(descending=True).values[k - 1])
    left = k - int((flat > threshold).sum())
    for name, s in tensors:
        positions = sort_positions(s, descending=True).reshape(-1)
        tied = (s.reshape(-1) == threshold).nonzero().reshape(-1)
        first = tied[positions[tied].argsort()][: max(left, 0)]
        mask = (s > threshold).reshape(-1)
        mask[first] = True
        left -= first.numel()
        out[name] = mask.reshape(s.shape)
    return out


@PROPERTY
@given(kind=kinds, seed=seeds, keep=st.floats(0.0, 1.0), count=st.integers(1, 4))
def test_global_cuts_from_summaries_and_from_streamed_scores_equal_the_reference(kind, seed, keep, count):
    tensors = [(f"t{i}", scores_of_kind(kind, [300, 17, 1000, 64][i], seed + i)) for i in range(count)]
    summaries = {name: TensorOrder.build(s) for name, s in tensors}
    streamed = GlobalThresholds(lambda k, e: iter(tensors))("magnitude", "e", keep)
    summarised = SummaryThresholds(lambda k, e: iter(summaries.items()))("magnitude", "e", keep)
    assert streamed == summarised
    want = global_reference(tensors, keep)
    for name, s in tensors:
        order = summaries[name]
        got = order.top(summarised.count(name, order.count_greater(summarised.threshold))).mask(s)
        assert torch.equal(got, want[name]), name


def test_global_cut_counts_split_the_ties_in_tensor_order():
    cut = global_cut(5, 1.0, [("a", 2, 2), ("b", 0, 3), ("c", 1, 0)])
    assert cut.threshold == 1.0 and dict(cut.ties) == {"a": 2} and cut.count("a", 2) == 4 and cut.count("b", 0) == 0
    assert global_cut(6, 1.0, [("a", 2, 2), ("b", 0, 3), ("c", 1, 0)]).count("b", 0) == 1
    assert math.isinf(TensorOrder.build(torch.ones(3)).select("asc", 0, 3).high)


@pytest.mark.parametrize("shape", [(7,), (3, 40), (2, 3, 5), (1,)])
def test_row_ranks_rank_each_row_by_magnitude_with_ties_in_index_order(shape):
    tau = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4).round() / 4  # many ties
    ranks = row_ranks(tau)
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    for row, got in zip(rows, ranks.reshape(rows.shape)):
        want = sorted(range(row.numel()), key=lambda i: (abs(float(row[i])), i))
        assert [want.index(i) for i in range(row.numel())] == got.tolist()
    assert ranks.dtype == torch.int16
