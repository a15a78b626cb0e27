"""Mixed precision: autocast, half-precision modules, output dtypes and accuracy against float64."""

import copy

import pytest
import torch
from torch import nn

import chunkconv
from chunkconv.geometry import conv_spec
from chunkconv.testing import mlp_generator

SPEC = conv_spec(2, in_channels=3, out_channels=4, kernel_size=3, padding=1)
KW = dict(out_channels=4, kernel_size=3, padding=1)
# unit roundoff of each half dtype: a result within a few of these of float64 is as good as it gets
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def _float64_reference(x, gen, upstream, bias=None, padding_mode="zeros"):
    """Output and gradients (input, bias, generator parameters) of the unchunked oracle in float64."""
    x = x.detach().double().requires_grad_()
    gen = copy.deepcopy(gen).double()
    leaves = [x, *gen.parameters()]
    if bias is not None:
        bias = bias.detach().double().requires_grad_()
        leaves.insert(1, bias)
    y = chunkconv.dynamic_conv_reference(x, gen, bias=bias, padding_mode=padding_mode, **KW)
    return y, torch.autograd.grad(y, leaves, upstream.double())


def _case(seed=0, size=8):
    torch.manual_seed(seed)
    gen = mlp_generator(SPEC, hidden=16, dtype=torch.float32)
    x = torch.randn(2, 3, size, size)
    bias = torch.randn(4)
    upstream = torch.randn(2, 4, size, size)
    return gen, x, bias, upstream


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_autocast_output_dtype_is_that_of_torch_conv(input_dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, dtype=input_dtype)
    gen = mlp_generator(SPEC, hidden=4, dtype=input_dtype)
    conv = chunkconv.DynamicConv(gen, 3, 4, 3, padding=1, chunk_size=7, dtype=input_dtype)
    static = nn.Conv2d(3, 4, 3, padding=1, dtype=input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = conv(x), static(x)
    assert y.dtype == want.dtype
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == want.dtype


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("chunk_size", [1, 37, None])
def test_autocast_bf16_matches_float64_within_bf16_tolerance(chunk_size, path):
    gen, x, bias, upstream = _case()
    conv = chunkconv.DynamicConv(copy.deepcopy(gen), 3, 4, 3, padding=1, chunk_size=chunk_size, path=path)
    conv.bias.data.copy_(bias)
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    # backward outside the autocast region, as training loops do: the Function replays forward's state
    grads = torch.autograd.grad(y, [x, conv.bias, *conv.generator.parameters()], upstream.to(y.dtype))
    assert y.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.float32] * len(grads)
    want_y, want_grads = _float64_reference(x, gen, upstream, bias)
    assert _relative_error(y, want_y) < 3 * EPS[torch.bfloat16]
    for g, w in zip(grads, want_grads):
        assert _relative_error(g, w) < 3 * EPS[torch.bfloat16]


def test_backward_replays_forward_autocast_state():
    seen = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = mlp_generator(SPEC, hidden=4, dtype=torch.float32)

        def forward(self, patches):
            out = self.inner(patches)
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))
            return out

    conv = chunkconv.DynamicConv(Recording(), 3, 4, 3, padding=1, chunk_size=10)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x)  # the first call also checks the generator (one more run)
        seen.clear()
        y = conv(x)
    forward_states = list(seen)
    seen.clear()
    y.float().sum().backward()
    assert forward_states == [(True, torch.bfloat16, torch.bfloat16)] * 3
    assert seen == forward_states

    # and the other way round: forward without autocast, backward inside an autocast region
    seen.clear()
    y = conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y.sum().backward()
    assert seen == [(False, torch.bfloat16, torch.float32)] * 6


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_half_module_and_input(dtype, padding_mode, path):
    gen, x, bias, upstream = _case()
    conv = chunkconv.DynamicConv(
        copy.deepcopy(gen), 3, 4, 3, padding=1, padding_mode=padding_mode, chunk_size=1, path=path
    )
    conv.bias.data.copy_(bias)
    conv = conv.to(dtype)
    xh = x.to(dtype).requires_grad_()
    y = conv(xh)
    static = nn.Conv2d(3, 4, 3, padding=1).to(dtype)
    assert y.dtype == static(xh).dtype == dtype
    leaves = [xh, conv.bias, *conv.generator.parameters()]
    grads = torch.autograd.grad(y, leaves, upstream.to(dtype))
    assert [g.dtype for g in grads] == [dtype] * len(grads)
    want_y, want_grads = _float64_reference(x, gen, upstream, bias, padding_mode)
    assert _relative_error(y, want_y) < 3 * EPS[dtype]
    # 128 chunks of one patch: the sums over chunks run in float32, so they stay as accurate as in one
    # chunk (about 1.4 eps); summed in the half dtype the parameter gradients were off by 3-4 eps
    for g, w in zip(grads, want_grads):
        assert _relative_error(g, w) < 2.5 * EPS[dtype]


def test_half_generator_under_autocast_with_float32_input():
    gen, x, bias, upstream = _case(size=6)
    half_gen = copy.deepcopy(gen).to(torch.bfloat16)
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = chunkconv.dynamic_conv2d(x, half_gen, 4, 3, padding=1, chunk_size=5)
    grads = torch.autograd.grad(y, [x, *half_gen.parameters()], upstream.to(y.dtype))
    assert y.dtype == torch.bfloat16 and grads[0].dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in grads[1:])
    want_y, want_grads = _float64_reference(x, gen, upstream)
    assert _relative_error(y, want_y) < 4 * EPS[torch.bfloat16]
    for g, w in zip(grads, want_grads):
        assert _relative_error(g, w) < 4 * EPS[torch.bfloat16]


def test_dtype_mismatch_without_autocast_is_refused_before_work():
    gen = mlp_generator(SPEC, hidden=4, dtype=torch.float32)
    x = torch.randn(1, 3, 5, 5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"has dtype torch.float32 but the input has dtype torch.bfloat16"):
        chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1)


def test_autocast_does_not_excuse_float64_mismatch():
    # autocast leaves float64 alone, so the generator's matmul would fail inside the chunk loop
    gen = mlp_generator(SPEC, hidden=4, dtype=torch.float64)
    x = torch.randn(1, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match=r"not float64"):
        chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1)


def test_float64_under_autocast_stays_float64_and_exact():
    gen = mlp_generator(SPEC, hidden=4)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=3)
        want = chunkconv.dynamic_conv_reference(x, gen, **KW)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_float64(dtype):
    gen, x, bias, upstream = _case()
    conv = chunkconv.DynamicConv(copy.deepcopy(gen), 3, 4, 3, padding=1, chunk_size=37).cuda()
    conv.bias.data.copy_(bias)
    xc = x.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        y = conv(xc)
        static = nn.Conv2d(3, 4, 3, padding=1).cuda()(xc)
    assert y.dtype == static.dtype == dtype
    grads = torch.autograd.grad(y, [xc, conv.bias, *conv.generator.parameters()], upstream.cuda().to(dtype))
    assert all(g.dtype == torch.float32 for g in grads)
    want_y, want_grads = _float64_reference(x, gen, upstream, bias)
    assert _relative_error(y.cpu(), want_y) < 3 * EPS[dtype]
    for g, w in zip(grads, want_grads):
        assert _relative_error(g.cpu(), w) < 3 * EPS[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_module_matches_float64(dtype):
    gen, x, bias, upstream = _case()
    conv = chunkconv.DynamicConv(copy.deepcopy(gen), 3, 4, 3, padding=1, chunk_size=1)
    conv.bias.data.copy_(bias)
    conv = conv.to("cuda", dtype)
    xc = x.to("cuda", dtype).requires_grad_()
    y = conv(xc)
    grads = torch.autograd.grad(y, [xc, conv.bias, *conv.generator.parameters()], upstream.to("cuda", dtype))
    want_y, want_grads = _float64_reference(x, gen, upstream, bias)
    assert y.dtype == dtype and _relative_error(y.cpu(), want_y) < 3 * EPS[dtype]
    for g, w in zip(grads, want_grads):
        assert g.dtype == dtype and _relative_error(g.cpu(), w) < 3 * EPS[dtype]


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("mode", ["bfloat16 module", "autocast"])
def test_budget_holds_in_half_precision(mode, path):
    # the planner measures the generator in the dtype it will run in; the float32 parameter-gradient
    # sums and the half-precision input-gradient buffer stay within what the plan counts
    gen, x, bias, upstream = _case(size=16)
    dtype = torch.bfloat16 if mode == "bfloat16 module" else torch.float32
    gen, x = gen.to(dtype), x.to(dtype).requires_grad_()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")

    def conv(budget):
        return chunkconv.DynamicConv(gen, 3, 4, 3, padding=1, budget=budget, path=path, dtype=dtype)

    with autocast:
        minimum = conv(2**40).plan(x).minimum_budget
        budget = int(1.3 * minimum)
        layer = conv(budget)
        plan = layer.plan(x)
        with chunkconv.MemoryTracker() as fwd:
            y = layer(x)
    assert y.dtype == torch.bfloat16 and plan.num_chunks > 1
    with chunkconv.MemoryTracker() as bwd:
        y.backward(upstream.to(y.dtype))
    assert fwd.peak <= budget, (plan, fwd)
    assert bwd.peak <= budget, (plan, bwd)
    want_y, want_grads = _float64_reference(x, gen, upstream, layer.bias)
    assert _relative_error(y, want_y) < 3 * EPS[torch.bfloat16]
    got = [x.grad, layer.bias.grad, *(p.grad for p in gen.parameters())]
    for g, w in zip(got, want_grads):
        assert _relative_error(g, w) < 3 * EPS[torch.bfloat16]
