"""The streamed deformable sampler (chunkconv.sampling) against the float64 oracle (chunkconv.deform_reference).

Outputs and gradients (input, offsets, mask) under both gradient rules, 1-3 D, offset groups with
asymmetric stride/padding/dilation, chunks that span images; the border table with hand-computed
values and gradients; offsets far outside; half dtypes against float64; bit-identical reruns; the
layout converters against DCNv3/DCNv4's own formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from chunkconv.deform_reference import (
    dcnv3_core_reference,
    dcnv4_core_reference,
    deform_conv_reference,
    deform_sample_reference,
)
from chunkconv.gather import ChunkIndex, is_column_major
from chunkconv.geometry import conv_spec
from chunkconv.reference import unfold_patches
from chunkconv.sampling import (
    DeformPatchStream,
    dcnv3_offsets,
    dcnv4_offsets,
    deform_fixed_costs,
    opmath_dtype,
    torchvision_offsets,
)

F64 = torch.float64


def _geom(x, kernel_size, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    d = x.dim() - 2
    spec = conv_spec(
        d,
        in_channels=x.shape[1],
        out_channels=x.shape[1],
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=padding_mode,
    )
    return spec.geometry(x.shape)


def run_stream(x, offsets, mask, geom, chunk_size, upstream=None, rule="torchvision"):
    """Every chunk's rows, concatenated ``(N * L, C * K)``, and, given ``upstream`` rows, the three gradients."""
    wants = upstream is not None
    stream = DeformPatchStream(
        x,
        offsets,
        mask,
        geom,
        rule=rule,
        input_grad=wants,
        offset_grad=wants,
        mask_grad=wants and mask is not None,
    )
    rows = []
    for start in range(0, geom.num_patches, chunk_size):
        chunk = ChunkIndex.build(start, min(start + chunk_size, geom.num_patches), geom)
        rows.append(stream.gather(chunk))
        if wants:
            stream.add_grad(chunk, upstream[chunk.start : chunk.end])
    return torch.cat(rows), (stream.grads() if wants else None)


def as_rows(patches):
    """Oracle patches ``(N, C * K, *out)`` as stream rows ``(N * L, C * K)``."""
    n, ck = patches.shape[:2]
    return patches.reshape(n, ck, -1).transpose(1, 2).reshape(-1, ck)


def oracle(x, offsets, mask, geom, upstream, rule="torchvision"):
    leaves = [t.detach().requires_grad_() for t in (x, offsets)]
    m = None if mask is None else mask.detach().requires_grad_()
    patches = deform_sample_reference(
        leaves[0],
        leaves[1],
        m,
        kernel_size=geom.kernel_size,
        stride=geom.stride,
        padding=[p for p, _ in geom.pads],
        dilation=geom.dilation,
        rule=rule,
    )
    rows = as_rows(patches)
    targets = leaves + ([m] if m is not None else [])
    grads = torch.autograd.grad(rows, targets, upstream)
    return rows.detach(), (*grads, None) if m is None else grads


@st.composite
def deform_cases(draw):
    d = draw(st.integers(1, 3), label="ndim")
    g = draw(st.sampled_from([1, 2, 3]), label="offset groups")
    c = g * draw(st.integers(1, 2), label="channels per offset group")
    small = d == 3
    ks = tuple(draw(st.integers(1, 2 if small else 3)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(d))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(d))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(d))
    spatial = tuple(
        draw(st.integers(max(1, dil[a] * (ks[a] - 1) + 1 - 2 * pad[a]), 4 if small else 7)) for a in range(d)
    )
    n = draw(st.integers(1, 3), label="batch")
    scale = draw(st.sampled_from([0.5, 2.0, 5.0]), label="offset scale")
    masked = draw(st.booleans(), label="mask")
    rule = draw(st.sampled_from(["torchvision", "strict"]), label="rule")
    chunk = draw(st.integers(1, 40), label="chunk_size")
    return n, c, spatial, g, ks, stride, pad, dil, scale, masked, rule, chunk


@given(case=deform_cases())
def test_stream_equals_oracle_values_and_gradients(case):
    n, c, spatial, g, ks, stride, pad, dil, scale, masked, rule, chunk = case
    x = torch.randn(n, c, *spatial, dtype=F64)
    geom = _geom(x, ks, stride, pad, dil)
    offsets = torch.randn(n, g, math.prod(ks), len(spatial), *geom.out_spatial, dtype=F64) * scale
    mask = torch.rand(n, g, math.prod(ks), *geom.out_spatial, dtype=F64) if masked else None
    upstream = torch.randn(geom.num_patches, geom.patch_size, dtype=F64)
    want, want_grads = oracle(x, offsets, mask, geom, upstream, rule)
    got, got_grads = run_stream(x, offsets, mask, geom, chunk, upstream, rule)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("input", "offsets", "mask"), got_grads, want_grads):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("d", [1, 2, 3])
def test_zero_offsets_equal_unfold_and_the_convolution(d):
    x = torch.randn(2, 4, *(6, 5, 4)[:d], dtype=F64, requires_grad=True)
    ks, stride, pad, dil = (3, 2, 2)[:d], (2, 1, 1)[:d], (1, 0, 1)[:d], (1, 2, 1)[:d]
    geom = _geom(x, ks, stride, pad, dil)
    offsets = torch.zeros(2, 2, math.prod(ks), d, *geom.out_spatial, dtype=F64)
    upstream = torch.randn(geom.num_patches, geom.patch_size, dtype=F64)
    got, (gx, _, _) = run_stream(x, offsets, None, geom, 7, upstream)
    x_pad = F.pad(x, [p for p in reversed(pad) for _ in (0, 1)])
    want = unfold_patches(x_pad, geom)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (want_gx,) = torch.autograd.grad(want, x, upstream)
    torch.testing.assert_close(gx, want_gx, rtol=1e-12, atol=1e-12)
    if d == 2:  # against F.unfold and, contracted with a grouped weight, F.conv2d
        columns = F.unfold(x, ks, dilation=dil, padding=pad, stride=stride)
        torch.testing.assert_close(got, columns.transpose(1, 2).reshape(-1, geom.patch_size), rtol=0, atol=0)
        w = torch.randn(6, 2, *ks, dtype=F64)
        y = deform_conv_reference(x, offsets.reshape(2, -1, *geom.out_spatial), w, None, stride, pad, dil)
        torch.testing.assert_close(y, F.conv2d(x, w, None, stride, pad, dil, groups=2))
        rows = got.reshape(2, -1, 2, 2 * math.prod(ks))
        y_stream = torch.einsum("nlgp,gop->ngol", rows, w.reshape(2, 3, -1)).reshape(y.shape)
        torch.testing.assert_close(y_stream, y)


def test_integer_offsets_equal_the_shifted_input():
    # an offset of (sy, sx) everywhere reads the input shifted by it, zeros beyond its border
    x = torch.randn(2, 3, 6, 7, dtype=F64)
    geom = _geom(x, (3, 2), stride=(1, 2), padding=(1, 2), dilation=(2, 1))
    for sy, sx in [(1, 0), (0, -2), (-3, 2), (5, -6)]:
        offsets = torch.zeros(2, 1, 6, 2, *geom.out_spatial, dtype=F64)
        offsets[:, :, :, 0], offsets[:, :, :, 1] = sy, sx
        got, _ = run_stream(x, offsets, None, geom, 11)
        m, (ho, wo) = 12, geom.out_spatial
        big = F.pad(x, (m, m, m, m))  # the windows start at o * stride - padding + shift
        y0, x0 = m - 1 + sy, m - 2 + sx
        shifted = big[..., y0 : y0 + (ho - 1) * 1 + 2 * 2 + 1, x0 : x0 + (wo - 1) * 2 + 1 * 1 + 1]
        want = F.unfold(shifted, (3, 2), dilation=(2, 1), stride=(1, 2))
        torch.testing.assert_close(got, want.transpose(1, 2).reshape(-1, geom.patch_size), rtol=0, atol=0)


# The border table: a 1x1 kernel on a 4x4 arange input (v[i, j] = 4 i + j), the location (1, 2)
# moved to (y, x); its value, its offsets' gradient (dy, dx) under both rules, and the input
# element that receives its gradient (with weight w), for an upstream gradient of 1 there.
BORDER = [
    # name, (y, x), value, torchvision (gy, gx), strict (gy, gx), {input index: weight}
    ("interior integer", (1.0, 2.0), 6.0, (4.0, 1.0), (4.0, 1.0), {(1, 2): 1.0}),
    ("exactly -1 in y", (-1.0, 2.0), 0.0, (2.0, 0.0), (0.0, 0.0), {}),
    ("exactly -1 in x", (1.0, -1.0), 0.0, (0.0, 4.0), (0.0, 0.0), {}),
    ("last row", (3.0, 2.0), 14.0, (-14.0, 1.0), (-14.0, 1.0), {(3, 2): 1.0}),
    ("last column", (1.0, 3.0), 7.0, (4.0, -7.0), (4.0, -7.0), {(1, 3): 1.0}),
    ("half a pixel below", (3.5, 2.0), 7.0, (-14.0, 0.5), (-14.0, 0.5), {(3, 2): 0.5}),
    ("half a pixel above", (-0.5, 2.0), 1.0, (2.0, 0.5), (2.0, 0.5), {(0, 2): 0.5}),
    ("exactly size", (4.0, 2.0), 0.0, (0.0, 0.0), (0.0, 0.0), {}),
    ("between -2 and -1", (-1.5, 2.0), 0.0, (0.0, 0.0), (0.0, 0.0), {}),
    ("far outside", (51.0, -48.0), 0.0, (0.0, 0.0), (0.0, 0.0), {}),
    ("very far outside", (-1e4, 1e4), 0.0, (0.0, 0.0), (0.0, 0.0), {}),
]


def border_case(where, dtype=F64):
    x = torch.arange(16, dtype=dtype).reshape(1, 1, 4, 4)
    offsets = torch.zeros(1, 1, 1, 2, 4, 4, dtype=dtype)
    offsets[0, 0, 0, :, 1, 2] = torch.tensor(where, dtype=dtype) - torch.tensor([1.0, 2.0], dtype=dtype)
    mask = torch.full((1, 1, 1, 4, 4), 0.5, dtype=dtype)
    upstream = torch.zeros(16, 1, dtype=dtype)
    upstream[1 * 4 + 2] = 1.0
    return x, offsets, mask, upstream


def check_border(row, grads, name, where, value, tv, strict, touched, rule):
    gx, goff, gmask = grads
    want_gx = torch.zeros(4, 4, dtype=F64)
    for idx, w in touched.items():
        want_gx[idx] = 0.5 * w  # times the mask
    gy_gx = tv if rule == "torchvision" else strict
    torch.testing.assert_close(row.to(F64), torch.tensor(0.5 * value, dtype=F64), msg=f"{name}: value")
    torch.testing.assert_close(gx.to(F64)[0, 0], want_gx, msg=f"{name}: input gradient")
    torch.testing.assert_close(
        goff.to(F64)[0, 0, 0, :, 1, 2], 0.5 * torch.tensor(gy_gx, dtype=F64), msg=f"{name}: offsets gradient"
    )
    torch.testing.assert_close(gmask.to(F64)[0, 0, 0, 1, 2], torch.tensor(value, dtype=F64), msg=f"{name}: mask grad")
    others = goff.clone()
    others[0, 0, 0, :, 1, 2] = 0
    assert not others.any(), f"{name}: gradient at other locations"


@pytest.mark.parametrize("rule", ["torchvision", "strict"])
@pytest.mark.parametrize(("name", "where", "value", "tv", "strict", "touched"), BORDER, ids=[b[0] for b in BORDER])
@pytest.mark.parametrize("impl", ["stream", "oracle"])
def test_border_table(impl, name, where, value, tv, strict, touched, rule):
    x, offsets, mask, upstream = border_case(where)
    geom = _geom(x, 1)
    if impl == "stream":
        rows, grads = run_stream(x, offsets, mask, geom, 5, upstream, rule)
    else:
        rows, grads = oracle(x, offsets, mask, geom, upstream, rule)
    check_border(rows[6, 0], grads, name, where, value, tv, strict, touched, rule)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_border_table_in_low_precision(dtype):
    # every entry of the table is exactly representable: the low-precision stream gives it exactly
    geom = _geom(torch.zeros(1, 1, 4, 4), 1)
    for name, where, value, tv, strict, touched in BORDER:
        if dtype != torch.float32 and abs(where[0]) > 100:
            continue  # 1e4 is not representable in bfloat16 (it rounds to 9984, still far outside)
        for rule in ("torchvision", "strict"):
            x, offsets, mask, upstream = border_case(where, dtype)
            rows, grads = run_stream(x, offsets, mask, geom, 16, upstream, rule)
            assert rows.dtype == dtype and all(g.dtype == dtype for g in grads)
            check_border(rows[6, 0], grads, name, where, value, tv, strict, touched, rule)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("far", [50.0, -50.0, 1e4, -1e4, 1e30, float("inf")])
def test_offsets_far_outside_give_zeros_without_index_errors(dtype, far):
    x = torch.randn(2, 4, 5, 6).to(dtype)
    geom = _geom(x, 3, padding=1)
    offsets = torch.full((2, 2, 9, 2, 5, 6), far).to(dtype)  # 1e30 is inf in float16
    offsets[:, :, :, 1] = -far if far != float("inf") else 0.0
    mask = torch.rand(2, 2, 9, 5, 6).to(dtype)
    upstream = torch.randn(geom.num_patches, geom.patch_size).to(dtype)
    for rule in ("torchvision", "strict"):
        rows, grads = run_stream(x, offsets, mask, geom, 13, upstream, rule)
        assert not rows.any()
        for grad in grads:
            assert not grad.any()


def test_a_nan_offset_gives_nan_there_and_indexes_nothing_out_of_range():
    x = torch.randn(1, 2, 4, 4, dtype=F64)
    geom = _geom(x, 1)
    offsets = torch.zeros(1, 1, 1, 2, 4, 4, dtype=F64)
    offsets[0, 0, 0, 0, 2, 1] = float("nan")
    rows, _ = run_stream(x, offsets, None, geom, 16)
    assert rows[9].isnan().all() and not rows[torch.arange(16) != 9].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_against_float64(dtype):
    n, c, g = 2, 6, 3
    x = torch.randn(n, c, 9, 8, dtype=F64)
    geom = _geom(x, (3, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1))
    offsets = torch.randn(n, g, 9, 2, *geom.out_spatial, dtype=F64) * 3
    mask = torch.rand(n, g, 9, *geom.out_spatial, dtype=F64)
    upstream = torch.randn(geom.num_patches, geom.patch_size, dtype=F64)
    low = [t.to(dtype) for t in (x, offsets, mask, upstream)]
    # the oracle on the low-precision tensors' exact values: what remains is the computation's error
    want, want_grads = oracle(*[t.to(F64) for t in low[:3]], geom, low[3].to(F64))
    got, got_grads = run_stream(*low[:3], geom, 17, low[3])
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6}[dtype]
    scale = want.abs().max()
    assert got.dtype == dtype and (got.to(F64) - want).abs().max() <= tol * scale
    for name, a, b in zip(("input", "offsets", "mask"), got_grads, want_grads):
        assert a.dtype == dtype, name
        err = (a.to(F64) - b).abs().max() / b.abs().max()
        assert err <= 4 * tol, f"{name}: relative error {err:.3g} > {4 * tol}"


def test_half_positions_are_computed_in_float32():
    # 200.5 is not representable in bfloat16 (its spacing there is 1): the stream must not round
    # the position o + offset in the input's dtype (200.5 would become 200 and read a zero)
    assert torch.tensor(200.5, dtype=torch.bfloat16).item() == 200.0
    x = (torch.arange(300) % 2).to(torch.bfloat16).reshape(1, 1, 300)
    geom = _geom(x, 1)
    offsets = torch.full((1, 1, 1, 1, 300), 0.5, dtype=torch.bfloat16)
    rows, _ = run_stream(x, offsets, None, geom, 300)
    assert rows[200, 0].item() == rows[201, 0].item() == 0.5
    assert opmath_dtype(torch.bfloat16) == opmath_dtype(torch.float16) == torch.float32
    assert opmath_dtype(F64) == F64


@pytest.mark.parametrize("threads", [1, 2])
def test_reruns_are_bit_identical(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(2, 8, 12, 11)
        geom = _geom(x, 3, padding=1)
        offsets = torch.randn(2, 2, 9, 2, 12, 11) * 0.3  # small offsets: many samples share pixels
        mask = torch.rand(2, 2, 9, 12, 11)
        upstream = torch.randn(geom.num_patches, geom.patch_size)
        first = run_stream(x, offsets, mask, geom, 50, upstream)
        for _ in range(3):
            again = run_stream(x, offsets, mask, geom, 50, upstream)
            assert torch.equal(again[0], first[0])
            assert all(torch.equal(a, b) for a, b in zip(again[1], first[1]))
    finally:
        torch.set_num_threads(before)


def test_results_do_not_depend_on_the_chunking_beyond_rounding():
    x = torch.randn(3, 4, 6, 5, dtype=F64)
    geom = _geom(x, 3, padding=1, stride=(2, 1))
    offsets = torch.randn(3, 1, 9, 2, *geom.out_spatial, dtype=F64)
    upstream = torch.randn(geom.num_patches, geom.patch_size, dtype=F64)
    whole = run_stream(x, offsets, None, geom, geom.num_patches, upstream)
    for chunk in (1, 7, 16):  # 7 and 16 cut across rows and images
        part = run_stream(x, offsets, None, geom, chunk, upstream)
        assert torch.equal(part[0], whole[0])  # each row is computed alone: exactly equal
        for a, b in zip(part[1][:2], whole[1][:2]):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_the_columns_layout_holds_the_same_rows():
    x = torch.randn(2, 4, 5, 6, dtype=F64)
    geom = _geom(x, 3, padding=1)
    offsets = torch.randn(2, 2, 9, 2, 5, 6, dtype=F64)
    mask = torch.rand(2, 2, 9, 5, 6, dtype=F64)
    upstream = torch.randn(geom.num_patches, geom.patch_size, dtype=F64)
    chunk = ChunkIndex.build(7, 41, geom)  # across the two images
    streams = [
        DeformPatchStream(x, offsets, mask, geom, input_grad=True, offset_grad=True, mask_grad=True, layout=layout)
        for layout in ("rows", "columns")
    ]
    rows, columns = (s.gather(chunk) for s in streams)
    assert rows.is_contiguous() and is_column_major(columns) and torch.equal(rows, columns)
    streams[0].add_grad(chunk, upstream[7:41])
    streams[1].add_grad(chunk, upstream[7:41].t().contiguous().t())  # column-major gradients
    for a, b in zip(*(s.grads() for s in streams)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match=r"^Invalid value for `layout`"):
        DeformPatchStream(x, offsets, mask, geom, layout="cols")


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_fixed_costs_are_the_streams_own_buffers(dtype):
    x = torch.randn(2, 6, 7, 5).to(dtype)
    geom = _geom(x, (3, 2), stride=(2, 1), padding=1)
    offsets = torch.randn(2, 3, 6, 2, *geom.out_spatial).to(dtype)
    mask = torch.rand(2, 3, 6, *geom.out_spatial).to(dtype)
    stream = DeformPatchStream(x, offsets, mask, geom, input_grad=True, offset_grad=True, mask_grad=True)
    forward, backward = deform_fixed_costs(geom, 3, dtype, input_grad=True, offset_grad=True, mask_grad=True)
    assert forward == {"input, channels-last rows": stream.source.nbytes}
    assert backward["input gradient rows"] == stream._grad_src.nbytes
    assert backward["offsets gradient"] == stream._grad_off.nbytes
    assert backward["mask gradient"] == stream._grad_mask.nbytes
    assert "input gradient" not in backward  # made where the input's copy was, once it is freed
    assert x.nbytes <= stream.source.nbytes
    source, grads = stream.source, stream.grads()
    assert not hasattr(stream, "source") and grads[0] is not None and grads[0].nbytes <= source.nbytes
    _, none = deform_fixed_costs(geom, 3, dtype)
    assert sum(none.values()) == source.nbytes


def test_the_stream_follows_the_protocol_and_reports_only_what_was_asked():
    x = torch.randn(1, 2, 4, 4, dtype=F64)
    geom = _geom(x, 3, padding=1)
    offsets = torch.randn(1, 1, 9, 2, 4, 4, dtype=F64)
    stream = DeformPatchStream(x, offsets, None, geom, offset_grad=True)
    assert stream.requires_grad and stream.grad() is None
    chunk = ChunkIndex.build(0, 16, geom)
    stream.add_grad(chunk, torch.ones(16, 18, dtype=F64))
    gx, goff, gmask = stream.grads()
    assert gx is None and gmask is None and goff.shape == offsets.shape
    assert not DeformPatchStream(x, offsets, None, geom).requires_grad


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (
            {"offsets": (1, 1, 9, 2, 4, 3)},
            ValueError,
            r"^Expected offsets of shape \(N=1, G, K=9, d=2, \*out=\(4, 4\)\)",
        ),
        ({"offsets": (1, 3, 9, 2, 4, 4)}, ValueError, r"divides in_channels=2, got G=3"),
        ({"mask": (1, 1, 8, 4, 4)}, ValueError, r"^Expected a mask of shape \(1, 1, 9, 4, 4\)"),
        (
            {"padding_mode": "reflect"},
            ValueError,
            r"pads with zeros only; expected padding_mode='zeros', got padding_mode='reflect'",
        ),
        ({"rule": "mmcv"}, ValueError, r"^Invalid value for `rule`"),
        ({"int_offsets": True}, TypeError, r"^Expected floating-point offsets"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(change, error, pattern):
    x = torch.randn(1, 2, 4, 4, dtype=F64)
    geom = _geom(x, 3, padding=1, padding_mode=change.get("padding_mode", "zeros"))
    offsets = torch.zeros(change.get("offsets", (1, 1, 9, 2, 4, 4)), dtype=F64)
    if change.get("int_offsets"):
        offsets = offsets.long()
    mask = torch.zeros(change["mask"], dtype=F64) if "mask" in change else None
    with pytest.raises(error, match=pattern):
        DeformPatchStream(x, offsets, mask, geom, rule=change.get("rule", "torchvision"))


# -- layouts ---------------------------------------------------------------------------------


def test_torchvision_offsets_are_views_in_the_canonical_layout():
    offset = torch.randn(2, 3 * 6 * 2, 4, 5)
    mask = torch.randn(2, 3 * 6, 4, 5)
    canon, m = torchvision_offsets(offset, mask, (2, 3))
    assert canon.shape == (2, 3, 6, 2, 4, 5) and canon.data_ptr() == offset.data_ptr()
    assert canon[1, 2, 4, 0, 3, 1] == offset[1, (2 * 6 + 4) * 2 + 0, 3, 1]  # (g, tap, dy)
    assert m.shape == (2, 3, 6, 4, 5) and m[1, 2, 4, 3, 1] == mask[1, 2 * 6 + 4, 3, 1]
    with pytest.raises(ValueError, match=r"K \* d = 12"):
        torchvision_offsets(offset[:, :-1], None, (2, 3))


def _dcn_stream_output(x_cl, offsets, mask, geom, group, upstream=None):
    """The stream with DCN's sum over taps: ``(N, Ho, Wo, G * D)`` channels-last."""
    x = x_cl.permute(0, 3, 1, 2)
    n, c = x.shape[:2]
    up_rows = None
    if upstream is not None:  # d out / d rows: the upstream repeated over the taps
        k = geom.kernel_numel
        up_rows = upstream.reshape(-1, c, 1).expand(-1, c, k).reshape(-1, c * k)
    rows, grads = run_stream(x, offsets, mask, geom, 9, up_rows, rule="strict")
    out = rows.reshape(n, *geom.out_spatial, c, -1).sum(-1)
    return out, grads


@pytest.mark.parametrize("remove_center", [False, True])
@pytest.mark.parametrize("packing", ["dcnv3", "dcnv4"])
def test_dcn_converters_with_the_stream_equal_the_dcn_references(packing, remove_center):
    n, h, w, group, dch = 2, 7, 6, 2, 3
    kh, kw, sh, sw, ph, pw, dh, dw, scale = 3, 5, 2, 1, 1, 2, 1, 2, 1.7
    x_cl = torch.randn(n, h, w, group * dch, dtype=F64, requires_grad=True)
    geom = _geom(x_cl.permute(0, 3, 1, 2), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    ho, wo = geom.out_spatial
    kk = kh * kw - int(remove_center)
    geo = dict(kernel_size=(kh, kw), dilation=(dh, dw), group=group, offset_scale=scale, remove_center=remove_center)
    args = (kh, kw, sh, sw, ph, pw, dh, dw, group, dch, scale, remove_center)
    if packing == "dcnv3":
        offset = (torch.randn(n, ho, wo, group * kk * 2, dtype=F64) * 2).requires_grad_()
        mask = torch.rand(n, ho, wo, group * kk, dtype=F64, requires_grad=True)
        leaves = (x_cl, offset, mask)
        want = dcnv3_core_reference(x_cl, offset, mask, *args)
        canon, cmask = dcnv3_offsets(offset, mask, **geo)
    else:
        width = -(-group * kk * 3 // 8) * 8
        offset_mask = (torch.randn(n, ho, wo, width, dtype=F64) * 2).requires_grad_()
        leaves = (x_cl, offset_mask)
        want = dcnv4_core_reference(x_cl, offset_mask, *args)
        canon, cmask = dcnv4_offsets(offset_mask, **geo)
    assert canon.shape == (n, group, kh * kw, 2, ho, wo) and cmask.shape == (n, group, kh * kw, ho, wo)
    upstream = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves, upstream)
    got, (gx, goff, gmask) = _dcn_stream_output(x_cl.detach(), canon.detach(), cmask.detach(), geom, group, upstream)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    # the converters are plain tensor ops: autograd carries the canonical gradients back
    got_grads = (gx.permute(0, 2, 3, 1), *torch.autograd.grad((canon, cmask), leaves[1:], (goff, gmask)))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    if packing == "dcnv4":
        assert not want_grads[1][..., group * kk * 3 :].any()  # the padding is ignored


def test_dcnv4_refuses_an_unpadded_last_dimension():
    with pytest.raises(ValueError, match=r"\(N, Ho, Wo, 56\) \(G \* 3K' = 54 padded to a multiple of 8\)"):
        dcnv4_offsets(torch.zeros(1, 2, 2, 54), kernel_size=(3, 3), dilation=(1, 1), group=2, offset_scale=1.0)
    with pytest.raises(ValueError, match=r"remove_center needs an odd kernel"):
        dcnv3_offsets(
            torch.zeros(1, 2, 2, 6),
            torch.zeros(1, 2, 2, 3),
            kernel_size=(2, 2),
            dilation=(1, 1),
            group=1,
            offset_scale=1.0,
            remove_center=True,
        )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_equals_cpu_and_is_deterministic_when_asked(dtype):
    x = torch.randn(2, 6, 9, 8).to(dtype)
    geom = _geom(x, 3, padding=(2, 1), stride=(1, 2), dilation=(2, 1))
    offsets = (torch.randn(2, 3, 9, 2, *geom.out_spatial) * 2).to(dtype)
    mask = torch.rand(2, 3, 9, *geom.out_spatial).to(dtype)
    upstream = torch.randn(geom.num_patches, geom.patch_size).to(dtype)
    want, want_grads = run_stream(x, offsets, mask, geom, 37, upstream)
    cuda = [t.cuda() for t in (x, offsets, mask, upstream)]
    got, got_grads = run_stream(*cuda[:3], geom, 37, cuda[3])
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run_stream(*cuda[:3], geom, 37, cuda[3])
        again = run_stream(*cuda[:3], geom, 37, cuda[3])
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
