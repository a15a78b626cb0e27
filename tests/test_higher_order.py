"""Double backward is not supported: it fails loudly, never silently drops a term."""

import pytest
import torch

import chunkconv
from chunkconv.geometry import conv_spec
from chunkconv.testing import mlp_generator

SPEC = conv_spec(2, in_channels=3, out_channels=4, kernel_size=3, padding=1)
KW = dict(out_channels=4, kernel_size=3, padding=1)
MESSAGE = r"chunkconv does not support double backward .* use chunkconv\.dynamic_conv_reference"


def _setup(path="auto"):
    gen = mlp_generator(SPEC, hidden=4)
    conv = chunkconv.DynamicConv(gen, 3, 4, 3, padding=1, chunk_size=5, dtype=torch.float64, path=path)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    return conv, x


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_second_backward_raises_a_clear_error(path):
    conv, x = _setup(path)
    (gx,) = torch.autograd.grad(conv(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=MESSAGE):
        gx.square().sum().backward()


def test_gradient_penalty_is_not_silently_dropped():
    # the upstream gradient (ones) does not require grad, which once_differentiable would let through
    conv, x = _setup()
    y = conv(x)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    loss = y.square().mean() + gx.square().sum()
    with pytest.raises(RuntimeError, match=MESSAGE):
        loss.backward()
    params = list(conv.parameters())
    (gp,) = torch.autograd.grad(conv(x).sum(), params[1], create_graph=True)
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.grad(gp.sum(), x)


def test_create_graph_leaves_first_order_gradients_unchanged():
    conv, x = _setup()
    leaves = [x, *conv.parameters()]
    up = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    plain = torch.autograd.grad(conv(x), leaves, up)
    with_graph = torch.autograd.grad(conv(x), leaves, up, create_graph=True)
    want = torch.autograd.grad(chunkconv.dynamic_conv_reference(x, conv.generator, bias=conv.bias, **KW), leaves, up)
    for a, b, w in zip(plain, with_graph, want):
        assert torch.equal(a, b.detach())
        torch.testing.assert_close(a, w)


def test_the_suggested_reference_supports_gradient_penalties():
    conv, x = _setup()
    y = chunkconv.dynamic_conv_reference(x, conv.generator, bias=conv.bias, **KW)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    gx.square().sum().backward()
    assert all(p.grad is not None for p in conv.generator.parameters())
