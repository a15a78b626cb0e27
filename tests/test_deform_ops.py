"""chunkconv.ops against the float64 oracle (chunkconv.deform_reference): values and every gradient.

deform_conv1d/2d/3d over offset groups, conv groups and asymmetric stride/padding/dilation, with
and without a mask, at chunk sizes from one location to all; zero offsets equal ``F.conv*d``; the
border table; far offsets give zeros; DeformConv1d/2d/3d hold torchvision's parameters (names,
shapes, initialisation, state dicts); dcnv3_core and dcnv4_core (remove_center, offset_scale,
asymmetric geometry, the strict rule); float32/float16/bfloat16 against float64; autocast;
torch.compile; errors before any work; budgets held as measured.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from chunkconv import MemoryTracker
from chunkconv.deform_reference import dcnv3_core_reference, dcnv4_core_reference, deform_conv_reference
from chunkconv.geometry import output_size
from chunkconv.ops import (
    DeformConv1d,
    DeformConv2d,
    DeformConv3d,
    dcnv3_core,
    dcnv4_core,
    deform_conv1d,
    deform_conv2d,
    deform_conv3d,
)

F64 = torch.float64
DEFORM = {1: deform_conv1d, 2: deform_conv2d, 3: deform_conv3d}
MODULES = {1: DeformConv1d, 2: DeformConv2d, 3: DeformConv3d}


def _grads(y, leaves, upstream):
    got = torch.autograd.grad(y, leaves, upstream, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, leaves)]


@st.composite
def deform_cases(draw):
    d = draw(st.sampled_from([1, 2, 3]), label="ndim")
    groups = draw(st.sampled_from([1, 2]), label="groups")
    og = draw(st.sampled_from([1, 2]), label="offset groups")
    c = groups * og * draw(st.integers(1, 2), label="channels per group")
    o = groups * draw(st.integers(1, 2), label="out per group")
    kmax = (4, 3, 2)[d - 1]
    ks = tuple(draw(st.lists(st.integers(1, kmax), min_size=d, max_size=d), label="kernel"))
    stride = tuple(draw(st.lists(st.integers(1, 2), min_size=d, max_size=d), label="stride"))
    pad = tuple(draw(st.lists(st.integers(0, 2), min_size=d, max_size=d), label="padding"))
    dil = tuple(draw(st.lists(st.integers(1, 2), min_size=d, max_size=d), label="dilation"))
    span = (8, 4, 2)[d - 1]
    sizes = tuple(
        draw(st.integers(max(1, dl * (k - 1) + 1 - 2 * p), max(1, dl * (k - 1) + 1 - 2 * p) + span), label="size")
        for k, p, dl in zip(ks, pad, dil)
    )
    n = draw(st.integers(1, 2), label="batch")
    out = tuple(output_size(s, k, t, 2 * p, dl) for s, k, t, p, dl in zip(sizes, ks, stride, pad, dil))
    total = n * math.prod(out)
    chunk = draw(st.integers(1, total + 1), label="chunk_size")
    masked = draw(st.booleans(), label="mask")
    bias = draw(st.booleans(), label="bias")
    scale = draw(st.sampled_from([0.5, 2.0]), label="offset scale")
    return d, n, c, o, groups, og, ks, stride, pad, dil, sizes, out, chunk, masked, bias, scale


@given(case=deform_cases())
def test_deform_conv_matches_the_oracle(case):
    d, n, c, o, groups, og, ks, stride, pad, dil, sizes, out, chunk, masked, bias, scale = case
    k = math.prod(ks)
    x = torch.randn(n, c, *sizes, dtype=F64, requires_grad=True)
    offset = (torch.randn(n, og * k * d, *out, dtype=F64) * scale).requires_grad_()
    mask = torch.rand(n, og * k, *out, dtype=F64, requires_grad=True) if masked else None
    w = torch.randn(o, c // groups, *ks, dtype=F64, requires_grad=True)
    b = torch.randn(o, dtype=F64, requires_grad=True) if bias else None
    y = DEFORM[d](x, offset, w, b, stride, pad, dil, mask, chunk_size=chunk)
    ref = deform_conv_reference(x, offset, w, b, stride, pad, dil, mask)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{m}\n{case}")
    leaves = [t for t in (x, offset, mask, w, b) if t is not None]
    up = torch.randn_like(ref)
    for g, want in zip(_grads(y, leaves, up), _grads(ref, leaves, up)):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-11, msg=lambda m: f"{m}\n{case}")


@pytest.mark.parametrize("d", [1, 2, 3])
def test_zero_offsets_equal_the_plain_convolution(d):
    ks, pad, dil, stride = (3, 2, 2)[:d], (1, 0, 1)[:d], (1, 2, 1)[:d], (2, 1, 1)[:d]
    x = torch.randn(2, 4, *(7, 6, 5)[:d], dtype=F64)
    w = torch.randn(6, 2, *ks, dtype=F64)
    b = torch.randn(6, dtype=F64)
    want = getattr(F, f"conv{d}d")(x, w, b, stride, pad, dil, groups=2)
    offset = torch.zeros(2, 2 * math.prod(ks) * d, *want.shape[2:], dtype=F64)
    torch.testing.assert_close(DEFORM[d](x, offset, w, b, stride, pad, dil, chunk_size=5), want)


# The border table: a 1x1 kernel on a 4x4 arange, one location's offset moved to a border case.
# (name, (dy, dx) of output (1, 1), value, d value / d dy, d value / d dx)
BORDER = [
    ("exactly -1 (torchvision: zero value, gradient v[0] = x[0, 1])", (-2.0, 0.0), 0.0, 1.0, 0.0),
    ("the last row", (2.0, 0.0), 13.0, -13.0, 1.0),
    ("half a pixel out", (2.5, 0.0), 0.5 * 13.0, -13.0, 0.5),
    ("far outside", (40.0, 0.0), 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize(("name", "shift", "value", "gy", "gx"), BORDER, ids=[b[0] for b in BORDER])
def test_the_border_table(name, shift, value, gy, gx):
    x = torch.arange(16, dtype=F64).view(1, 1, 4, 4)
    offset = torch.zeros(1, 2, 4, 4, dtype=F64)
    offset[0, :, 1, 1] = torch.tensor(shift, dtype=F64)
    offset.requires_grad_()
    w = torch.ones(1, 1, 1, 1, dtype=F64)
    y = deform_conv2d(x, offset, w, chunk_size=3)
    assert y[0, 0, 1, 1].item() == pytest.approx(value)
    g = torch.autograd.grad(y[0, 0, 1, 1], offset, retain_graph=True)[0][0, :, 1, 1]
    assert g.tolist() == pytest.approx([gy, gx])
    ref = deform_conv_reference(x, offset, w)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(
        torch.autograd.grad(ref[0, 0, 1, 1], offset)[0], torch.autograd.grad(y[0, 0, 1, 1], offset)[0]
    )


def test_far_offsets_give_zeros_without_index_errors():
    x = torch.randn(1, 2, 6, 6, dtype=F64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    for far in (50.0, -50.0, 1e4, float("inf")):
        offset = torch.full((1, 18, 6, 6), far, dtype=F64, requires_grad=True)
        y = deform_conv2d(x, offset, w, padding=1, chunk_size=7)
        assert torch.equal(y, torch.zeros_like(y))
        gx, goff = torch.autograd.grad(y.sum(), [x, offset])
        assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(goff, torch.zeros_like(goff))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_modules_hold_torchvisions_parameters(d):
    torch.manual_seed(3)
    conv = MODULES[d](4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    assert list(conv.state_dict()) == ["weight", "bias"]
    assert conv.weight.shape == (6, 2, *(3,) * d) and conv.bias.shape == (6,)
    assert conv.kernel_size == (3,) * d and conv.stride == (2,) * d and conv.padding == (1,) * d
    # torchvision's initialisation, drawn in its order from the same seed
    torch.manual_seed(3)
    w = torch.empty(6, 2, *(3,) * d)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    bound = 1 / math.sqrt(2 * 3**d)
    b = torch.empty(6).uniform_(-bound, bound)
    torch.testing.assert_close(conv.weight.detach(), w)
    torch.testing.assert_close(conv.bias.detach(), b)
    other = MODULES[d](4, 6, 3, stride=2, padding=1, groups=2, bias=False)
    assert other.bias is None and "bias=False" in repr(other)
    conv.load_state_dict({"weight": torch.ones_like(conv.weight), "bias": torch.zeros(6)})
    x = torch.randn(1, 4, *(5,) * d)
    out = (3,) * d
    offset = torch.randn(1, 2 * 3**d * d, *out)
    mask = torch.rand(1, 2 * 3**d, *out)
    ref = deform_conv_reference(
        x.double(), offset.double(), conv.weight.double(), conv.bias.double(), 2, 1, 1, mask.double()
    )
    torch.testing.assert_close(conv(x, offset, mask), ref.float(), rtol=1e-5, atol=1e-5)


def test_module_errors():
    with pytest.raises(ValueError, match="in_channels must be divisible by groups"):
        DeformConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="out_channels must be divisible by groups"):
        DeformConv2d(4, 3, 3, groups=2)
    with pytest.raises(ValueError, match=r"Invalid value for `kernel_size`"):
        DeformConv2d(4, 4, (3, 3, 3))


@st.composite
def dcn_cases(draw):
    kh, kw = draw(st.sampled_from([(3, 3), (1, 3), (3, 1), (5, 3), (2, 2), (1, 1)]), label="kernel")
    remove_center = kh % 2 == 1 and kw % 2 == 1 and kh * kw > 1 and draw(st.booleans(), label="remove_center")
    sh, sw = draw(st.sampled_from([(1, 1), (2, 1), (1, 2)]), label="stride")
    ph, pw = draw(st.sampled_from([(0, 0), (1, 1), (1, 0), (0, 2)]), label="padding")
    dh, dw = draw(st.sampled_from([(1, 1), (2, 1), (1, 2)]), label="dilation")
    g = draw(st.sampled_from([1, 2, 3]), label="group")
    gc = draw(st.integers(1, 3), label="group_channels")
    lo_h, lo_w = max(1, dh * (kh - 1) + 1 - 2 * ph), max(1, dw * (kw - 1) + 1 - 2 * pw)
    h = draw(st.integers(lo_h, lo_h + 5), label="H")
    w = draw(st.integers(lo_w, lo_w + 5), label="W")
    n = draw(st.integers(1, 2), label="N")
    scale = draw(st.sampled_from([1.0, 0.5, 2.0]), label="offset_scale")
    chunk = draw(st.integers(1, 60), label="chunk_size")
    return n, h, w, (kh, kw, sh, sw, ph, pw, dh, dw, g, gc, scale, remove_center), chunk


@given(case=dcn_cases(), v4=st.booleans())
def test_dcnv3_and_dcnv4_match_the_oracle(case, v4):
    n, h, w, args, chunk = case
    kh, kw, sh, sw, ph, pw, dh, dw, g, gc, scale, rc = args
    ho, wo = output_size(h, kh, sh, 2 * ph, dh), output_size(w, kw, sw, 2 * pw, dw)
    kk = kh * kw - int(rc)
    x = torch.randn(n, h, w, g * gc, dtype=F64, requires_grad=True)
    if v4:
        width = -(-g * kk * 3 // 8) * 8
        packed = torch.randn(n, ho, wo, width, dtype=F64, requires_grad=True)
        y, ref, leaves = (
            dcnv4_core(x, packed, *args, chunk_size=chunk),
            dcnv4_core_reference(x, packed, *args),
            [x, packed],
        )
    else:
        offset = (torch.randn(n, ho, wo, g * kk * 2, dtype=F64) * 1.5).requires_grad_()
        mask = torch.rand(n, ho, wo, g * kk, dtype=F64, requires_grad=True)
        y, ref = dcnv3_core(x, offset, mask, *args, chunk_size=chunk), dcnv3_core_reference(x, offset, mask, *args)
        leaves = [x, offset, mask]
    assert y.is_contiguous() and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{m}\n{case}")
    up = torch.randn_like(ref)
    for gy, want in zip(_grads(y, leaves, up), _grads(ref, leaves, up)):
        torch.testing.assert_close(gy, want, rtol=1e-10, atol=1e-11, msg=lambda m: f"{m}\n{case}")


def test_dcnv3_uses_the_strict_rule_and_deform_conv_torchvisions():
    # one location sampled at exactly y = -1: torchvision's gradient is v[0], DCNv3's zero
    x = torch.arange(16, dtype=F64).view(1, 4, 4, 1)
    offset = torch.zeros(1, 4, 4, 2, dtype=F64)
    offset[0, 1, 1, 1] = -2.0  # (x, y) per tap
    offset.requires_grad_()
    mask = torch.ones(1, 4, 4, 1, dtype=F64)
    y = dcnv3_core(x, offset, mask, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1.0)
    assert y[0, 1, 1, 0].item() == 0.0
    assert torch.autograd.grad(y[0, 1, 1, 0], offset)[0].abs().sum().item() == 0.0
    tv_offset = offset.detach().permute(0, 3, 1, 2).flip(1).contiguous().requires_grad_()  # (dy, dx)
    yt = deform_conv2d(x.permute(0, 3, 1, 2), tv_offset, torch.ones(1, 1, 1, 1, dtype=F64))
    assert torch.autograd.grad(yt[0, 0, 1, 1], tv_offset)[0][0, 0, 1, 1].item() == 1.0


def test_dcn_errors_before_any_work():
    x = torch.randn(1, 5, 5, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"expected 6 channels \(group=2 x group_channels=3\)"):
        dcnv3_core(x, torch.zeros(1, 5, 5, 36), torch.zeros(1, 5, 5, 18), 3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0)
    with pytest.raises(ValueError, match=r"^Invalid shape for `offset` of dcnv3_core; expected \(1, 5, 5, 36\)"):
        dcnv3_core(x, torch.zeros(1, 5, 5, 35), torch.zeros(1, 5, 5, 18), 3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0)
    with pytest.raises(ValueError, match=r"^Invalid shape for `mask` of dcnv3_core"):
        dcnv3_core(x, torch.zeros(1, 5, 5, 36), torch.zeros(1, 5, 5, 17), 3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0)
    with pytest.raises(ValueError, match=r"^Invalid shape for `offset_mask` of dcnv4_core; expected \(1, 5, 5, 56\)"):
        dcnv4_core(x, torch.zeros(1, 5, 5, 54), 3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0)
    with pytest.raises(ValueError, match=r"remove_center needs an odd kernel"):
        dcnv3_core(x, torch.zeros(1, 4, 4, 12), torch.zeros(1, 4, 4, 6), 2, 2, 1, 1, 0, 0, 1, 1, 2, 2, 1.0, True)


def test_deform_conv_errors_before_any_work():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(6, 2, 3, 3)
    with pytest.raises(ValueError, match=r"deform_conv2d expects a batched input"):
        deform_conv2d(x[0], torch.zeros(1, 18, 5, 5), w, padding=1)
    with pytest.raises(ValueError, match=r"expected weight.shape\[1\] \(C_in // groups\) to divide"):
        deform_conv2d(x, torch.zeros(1, 18, 5, 5), torch.randn(6, 3, 3, 3), padding=1)
    with pytest.raises(ValueError, match=r"^Invalid shape for `offsets` of deform_conv2d"):
        deform_conv2d(x, torch.zeros(1, 17, 5, 5), w, padding=1)
    with pytest.raises(ValueError, match=r"^Invalid shape for `mask` of deform_conv2d; expected \(1, 9, 5, 5\)"):
        deform_conv2d(x, torch.zeros(1, 18, 5, 5), w, padding=1, mask=torch.ones(1, 18, 5, 5))
    with pytest.raises(ValueError, match=r"^Invalid shape for `offsets` of deform_conv2d"):
        deform_conv2d(x, torch.zeros(1, 18, 5, 5), w, padding=0)
    with pytest.raises(TypeError, match=r"Invalid type for `offset` of deform_conv2d"):
        deform_conv2d(x, None, w)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 8e-2)], ids=str
)
def test_half_and_single_precision_against_float64(dtype, tol):
    x = torch.randn(2, 4, 9, 8, dtype=F64)
    offset = torch.randn(2, 2 * 18, 9, 8, dtype=F64) * 2
    mask = torch.rand(2, 18, 9, 8, dtype=F64)
    w = torch.randn(6, 4, 3, 3, dtype=F64) / 6
    b = torch.randn(6, dtype=F64)
    # the oracle gets the same (rounded) values: offsets rounded differently would move samples
    # across grid lines, where the derivative jumps
    leaves = [t.to(dtype).requires_grad_() for t in (x, offset, mask, w, b)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = deform_conv_reference(*leaves64[:2], *leaves64[3:], 1, 1, 1, leaves64[2])
    y = deform_conv2d(*leaves[:2], *leaves[3:], padding=1, mask=leaves[2], chunk_size=37)
    assert y.dtype == dtype
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=tol, atol=tol * scale)
    up = torch.randn_like(ref)
    for g, want in zip(torch.autograd.grad(y, leaves, up.to(dtype)), torch.autograd.grad(ref, leaves64, up)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_autocast_runs_the_contraction_in_autocasts_dtype():
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    offset = torch.randn(1, 18, 8, 8, requires_grad=True)
    conv = DeformConv2d(4, 4, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x, offset)
    assert y.dtype == torch.bfloat16
    ref = deform_conv_reference(x.double(), offset.double(), conv.weight.double(), conv.bias.double(), 1, 1, 1)
    torch.testing.assert_close(y.double(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())
    y.float().sum().backward()
    assert x.grad is not None and offset.grad is not None and conv.weight.grad is not None


def test_torch_compile_matches_eager():
    conv = DeformConv2d(3, 4, 3, padding=1).double()
    pre = torch.nn.Conv2d(3, 18 + 9, 3, padding=1).double()

    def step(x):
        h = pre(x)
        return conv(x, h[:, :18], h[:, 18:].sigmoid()).tanh().sum()

    x = torch.randn(1, 3, 6, 6, dtype=F64)
    want = step(x)
    want_grads = torch.autograd.grad(want, [*conv.parameters(), *pre.parameters()])
    got = torch.compile(step, backend="eager")(x)
    got_grads = torch.autograd.grad(got, [*conv.parameters(), *pre.parameters()])
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@given(data=st.data(), factor=st.floats(1.0, 3.0))
def test_random_budgets_hold_as_measured_in_training(data, factor):
    from chunkconv.errors import BudgetTooSmallError

    c = data.draw(st.sampled_from([2, 4]), label="channels")
    size = data.draw(st.integers(8, 24), label="size")
    x = torch.randn(1, c, size, size, dtype=F64, requires_grad=True)
    offset = (torch.randn(1, 18, size, size, dtype=F64) * 2).requires_grad_()
    mask = torch.rand(1, 9, size, size, dtype=F64, requires_grad=True)
    w = torch.randn(c, c, 3, 3, dtype=F64, requires_grad=True)
    budget = int(factor * 2**20 * size / 24)  # around the smallest budget that fits
    try:
        with MemoryTracker() as fwd:
            y = deform_conv2d(x, offset, w, padding=1, mask=mask, budget=budget)
    except BudgetTooSmallError as e:
        assert e.minimum > budget
        return
    assert fwd.peak <= budget
    with MemoryTracker() as bwd:
        y.backward(torch.randn_like(y))
    assert bwd.peak <= budget
