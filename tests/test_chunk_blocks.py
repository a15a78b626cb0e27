"""A chunk's range of the flat patch index, as rectangular blocks (``execute.range_blocks``)."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from chunkconv.gather import range_blocks


@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_blocks_cover_the_range_in_order(sizes, data):
    total = math.prod(sizes)
    start = data.draw(st.integers(0, total))
    end = data.draw(st.integers(start, total))
    flat = torch.arange(total).view(sizes)
    blocks = range_blocks(start, end, sizes)
    got = [i for b in blocks for i in flat[b].reshape(-1).tolist()]
    assert got == list(range(start, end))
    assert len(blocks) <= max(0, 2 * len(sizes) - 1)


def test_a_chunk_of_rows_is_a_partial_row_whole_rows_and_a_partial_row():
    assert range_blocks(5, 27, (4, 8)) == [(0, slice(5, 8)), (slice(1, 3), slice(None)), (3, slice(0, 3))]
