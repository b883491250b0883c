"""A slice's patched boundary entries: the union of the experts' listed indices and each expert's marks over it."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergetune.merge.boundary import sorted_union, union_marks

LISTS = st.lists(st.lists(st.integers(0, 5_000), max_size=60, unique=True).map(sorted), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(LISTS)
def test_sorted_union_is_the_distinct_values_ascending(lists):
    arrays = [np.array(values, dtype=np.int64) for values in lists]
    assert sorted_union(arrays).tolist() == sorted(set().union(*lists))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.lists(st.integers(0, 5_000), min_size=1, max_size=60, unique=True).map(sorted)), min_size=1, max_size=4))
def test_union_marks_mark_each_experts_own_entries(lists):
    listed = [None if values is None else torch.tensor(values, dtype=torch.int64) for values in lists]
    at, marks = union_marks(listed)
    present = [values for values in lists if values is not None]
    if not present:
        assert at is None and marks == [None] * len(lists)
        return
    union = sorted(set().union(*present))
    assert at.tolist() == union
    for values, mark in zip(lists, marks):
        if values is None:
            assert mark is None
        else:
            assert [u for u, m in zip(union, mark.tolist()) if m] == values
