"""Every chunkconv path against the unchunked oracle, forward and gradients, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import chunkconv
from chunkconv.testing import ConvCase, assert_matches_reference, conv_cases, mlp_generator


def _module(case: ConvCase, generator, chunk_size=None) -> chunkconv.DynamicConv:
    conv = chunkconv.DynamicConv(
        generator,
        case.spec.in_channels,
        case.spec.out_channels,
        case.spec.kernel_size,
        stride=case.spec.stride,
        padding=case.spec.padding,
        dilation=case.spec.dilation,
        groups=case.spec.groups,
        bias=case.bias,
        padding_mode=case.spec.padding_mode,
        dtype=torch.float64,
        chunk_size=chunk_size or case.chunk_size,
    )
    if conv.bias is not None:
        nn.init.normal_(conv.bias)
    return conv


@given(case=conv_cases(), path=st.sampled_from(["generic", "fast"]))
def test_matches_reference_forward_and_gradients(case: ConvCase, path: str):
    gen = mlp_generator(case.spec)
    conv = _module(case, gen)
    conv.path = path
    x = torch.randn(case.input_shape, dtype=torch.float64, requires_grad=True)
    wrt = [*gen.parameters()] + ([conv.bias] if conv.bias is not None else [])

    def reference(inp):
        return chunkconv.dynamic_conv_reference(inp, gen, bias=conv.bias, **case.kwargs)

    assert_matches_reference(conv, reference, x, wrt, context=repr(case))


@given(case=conv_cases(allow_empty=False), data=st.data())
def test_result_does_not_depend_on_chunk_size(case: ConvCase, data):
    gen = mlp_generator(case.spec)
    other = data.draw(st.integers(1, case.num_patches + 3), label="other_chunk_size")
    x = torch.randn(case.input_shape, dtype=torch.float64, requires_grad=True)
    a, b = _module(case, gen), _module(case, gen, chunk_size=other)
    b.load_state_dict(a.state_dict())
    assert_matches_reference(a, b, x, list(gen.parameters()), context=repr(case))


class _Constant(nn.Module):
    """A generator that ignores its patch: DynamicConv must then equal nn.Conv*d."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, patches):
        return self.weight.reshape(1, -1).expand(patches.shape[0], -1)


@given(case=conv_cases(allow_empty=False))
def test_constant_generator_equals_torch_conv(case: ConvCase):
    s = case.spec
    torch_conv = getattr(nn, f"Conv{s.ndim}d")(
        s.in_channels,
        s.out_channels,
        s.kernel_size,
        stride=s.stride,
        padding=s.padding,
        dilation=s.dilation,
        groups=s.groups,
        bias=case.bias,
        padding_mode=s.padding_mode,
        dtype=torch.float64,
    )
    gen = _Constant(torch_conv.weight.detach().clone())
    conv = _module(case, gen)
    if case.bias:
        conv.bias.data.copy_(torch_conv.bias.detach())
    x = torch.randn(case.input_shape, dtype=torch.float64, requires_grad=True)
    got = conv(x)
    want = torch_conv(x)
    assert got.shape == want.shape, (got.shape, want.shape, case)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    (gx,) = torch.autograd.grad(got, x, g)
    (wx,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, wx)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_gradcheck(ndim):
    case_kwargs = dict(kernel_size=(2,) * ndim, stride=(1,) * ndim, padding=(1,) * ndim, dilation=(1,) * ndim)
    spec = chunkconv.geometry.conv_spec(ndim, in_channels=2, out_channels=2, groups=1, **case_kwargs)
    gen = mlp_generator(spec, hidden=3)
    conv = chunkconv.DynamicConv(gen, 2, 2, padding_mode="reflect", dtype=torch.float64, chunk_size=5, **case_kwargs)
    x = torch.randn(2, 2, *([3] * ndim), dtype=torch.float64, requires_grad=True)
    params = (conv.bias, *gen.parameters())

    def f(inp, bias, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
            conv, {"bias": bias, **{f"generator.{n}": p for (n, _), p in zip(gen.named_parameters(), ps)}}
        ):
            return conv(inp)

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def test_output_shape_is_torch_formula():
    gen = mlp_generator(chunkconv.geometry.conv_spec(2, in_channels=3, out_channels=5, kernel_size=(3, 2)))
    conv = chunkconv.DynamicConv2d(gen, 3, 5, (3, 2), stride=(2, 3), padding=(1, 2), dilation=(2, 1))
    conv.double()
    x = torch.randn(2, 3, 17, 11, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 2, dtype=torch.float64)
    assert conv(x).shape == F.conv2d(x, w, stride=(2, 3), padding=(1, 2), dilation=(2, 1)).shape


def test_chunks_span_images_without_divisibility():
    # 3 images of 7x5 = 35 locations each, chunks of 16: most chunks straddle two images
    spec = chunkconv.geometry.conv_spec(2, in_channels=2, out_channels=3, kernel_size=3, padding=1)
    gen = mlp_generator(spec)
    x = torch.randn(3, 2, 7, 5, dtype=torch.float64)
    got = chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1, chunk_size=16)
    want = chunkconv.dynamic_conv_reference(x, gen, out_channels=3, kernel_size=3, padding=1)
    torch.testing.assert_close(got, want)
    assert math.ceil(3 * 35 / 16) == 7


def test_functional_matches_module_and_reference_methods_agree():
    spec = chunkconv.geometry.conv_spec(1, in_channels=2, out_channels=2, kernel_size=3)
    gen = mlp_generator(spec)
    x = torch.randn(2, 2, 9, dtype=torch.float64)
    forum = chunkconv.dynamic_conv_reference(x, gen, out_channels=2, kernel_size=(3,), method="forum")
    einsum = chunkconv.dynamic_conv_reference(x, gen, out_channels=2, kernel_size=(3,), method="einsum")
    torch.testing.assert_close(forum, einsum)
    torch.testing.assert_close(chunkconv.dynamic_conv1d(x, gen, 2, 3, chunk_size=4), forum)
    torch.testing.assert_close(chunkconv.dynamic_conv(x, gen, 2, (3,)), forum)
