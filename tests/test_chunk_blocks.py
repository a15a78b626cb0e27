"""A chunk's range of the flat patch index, as rectangular blocks (``gather.range_blocks``)."""

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


@given(data=st.data())
def test_folded_scatter_equals_the_per_tap_scatter(data):
    # 2-D patch gradients of large patches are folded (F.fold) block by block; the per-tap adds are
    # the definition
    import itertools

    from chunkconv.gather import ChunkIndex, _scatter_folded, blockwise
    from chunkconv.geometry import conv_spec

    draw = lambda s, label: data.draw(s, label=label)  # noqa: E731
    k = (draw(st.integers(1, 4), "kh"), draw(st.integers(1, 4), "kw"))
    stride = (draw(st.integers(1, 3), "sh"), draw(st.integers(1, 3), "sw"))
    dil = (draw(st.integers(1, 2), "dh"), draw(st.integers(1, 2), "dw"))
    c, n = draw(st.integers(1, 3), "channels"), draw(st.integers(1, 3), "batch")
    h = draw(st.integers(dil[0] * (k[0] - 1) + 1, 12), "height")
    w = draw(st.integers(dil[1] * (k[1] - 1) + 1, 12), "width")
    geom = conv_spec(2, in_channels=c, out_channels=1, kernel_size=k, stride=stride, dilation=dil).geometry(
        (n, c, h, w)
    )
    start = draw(st.integers(0, geom.num_patches - 1), "start")
    end = draw(st.integers(start + 1, geom.num_patches), "end")
    chunk = ChunkIndex.build(start, end, geom)
    grads = torch.randn(end - start, geom.patch_size, dtype=torch.float64)
    if draw(st.booleans(), "column-major"):  # as the structured forms' gradients come (folded on a GPU)
        grads = grads.t().contiguous().t()
    folded = torch.zeros(n, c, *geom.padded_spatial, dtype=torch.float64)
    _scatter_folded(folded, grads, chunk, geom)
    want = torch.zeros_like(folded)
    s_n, s_c, *s_sp = want.stride()
    size = (n, *geom.out_spatial, c)
    strides = (s_n, *(st_ * s for st_, s in zip(geom.stride, s_sp)), s_c)
    per_tap = grads.view(-1, c, geom.kernel_numel)
    for t, tap in enumerate(itertools.product(*(range(kk) for kk in k))):
        offset = sum(kk * dd * s for kk, dd, s in zip(tap, geom.dilation, s_sp))
        blockwise(want.as_strided(size, strides, offset), chunk.cells, per_tap[:, :, t], "add")
    torch.testing.assert_close(folded, want)


@st.composite
def _chunk_geometries(draw):
    """A geometry of 1-3 spatial dims (strides, dilations, channels, batch) and a chunk of it."""
    from chunkconv.gather import ChunkIndex
    from chunkconv.geometry import conv_spec

    ndim = draw(st.integers(1, 3), label="ndim")
    k = tuple(draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim), label="kernel_size"))
    stride = tuple(draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim), label="stride"))
    dil = tuple(draw(st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim), label="dilation"))
    c, n = draw(st.integers(1, 3), label="channels"), draw(st.integers(1, 3), label="batch")
    spatial = tuple(draw(st.integers(d * (kk - 1) + 1, d * (kk - 1) + 6), label="size") for kk, d in zip(k, dil))
    spec = conv_spec(ndim, in_channels=c, out_channels=1, kernel_size=k, stride=stride, dilation=dil)
    geom = spec.geometry((n, c, *spatial))
    start = draw(st.integers(0, geom.num_patches - 1), label="start")
    end = draw(st.integers(start + 1, geom.num_patches), label="end")
    return geom, ChunkIndex.build(start, end, geom)


@given(case=_chunk_geometries())
def test_patch_columns_hold_the_patch_rows_in_the_transposed_layout(case):
    # the "columns" layout: the same (B, P) values, as the transpose of a contiguous (P, B) buffer
    from chunkconv.gather import gather_patch_columns, gather_patches, is_column_major

    geom, chunk = case
    x = torch.randn(geom.batch, geom.in_channels, *geom.padded_spatial, dtype=torch.float64)
    columns = gather_patch_columns(x, chunk, geom)
    assert torch.equal(columns, gather_patches(x, chunk, geom))
    if columns.shape[0] > 1 and columns.shape[1] > 1:  # else both layouts are one and the same memory
        assert is_column_major(columns) and not is_column_major(columns.contiguous())


@given(case=_chunk_geometries(), transposed=st.booleans(), sequential=st.booleans())
def test_column_scatter_equals_the_per_tap_scatter(case, transposed, sequential):
    # column-major gradients are added one tap per block (on the CPU in one _foreach_add_, on other
    # devices one add_ after another); the scatter of contiguous rows is the definition; either
    # layout gives the same sums
    from unittest import mock

    from chunkconv import gather
    from chunkconv.gather import _scatter_columns, scatter_patch_grads

    geom, chunk = case
    grads = torch.randn(chunk.end - chunk.start, geom.patch_size, dtype=torch.float64)
    if transposed:
        grads = grads.t().contiguous().t()
    got = torch.zeros(geom.batch, geom.in_channels, *geom.padded_spatial, dtype=torch.float64)
    with mock.patch.object(torch, "_foreach_add_", gather._add_each if sequential else torch._foreach_add_):
        _scatter_columns(got, grads, chunk, geom)
    want = torch.zeros_like(got)
    scatter_patch_grads(want, grads.contiguous(), chunk, geom)
    torch.testing.assert_close(got, want)
