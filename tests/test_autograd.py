"""The autograd Function: faithful recomputation, parameters as real inputs, nothing kept without grad."""

import pytest
import torch
from torch import nn

import chunkconv
from chunkconv.geometry import conv_spec
from chunkconv.testing import RecordingDropout, mlp_generator

SPEC = conv_spec(2, in_channels=3, out_channels=4, kernel_size=3, padding=1)


def _dropout_generator():
    drop = RecordingDropout()
    gen = nn.Sequential(nn.Linear(27, 6), nn.Tanh(), drop, nn.Linear(6, 4 * 27)).double()
    return gen, drop


def test_dropout_masks_are_replayed_in_backward():
    gen, drop = _dropout_generator()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=7)  # the first call also checks the generator
    drop.masks.clear()
    y = chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=7)
    forward_masks = list(drop.masks)
    drop.masks.clear()
    upstream = torch.randn_like(y)
    rng_before = torch.get_rng_state()
    grads = torch.autograd.grad(y, [x, *gen.parameters()], upstream)
    assert torch.equal(torch.get_rng_state(), rng_before), "backward must not advance the global RNG"
    assert len(drop.masks) == len(forward_masks) == 9
    for a, b in zip(forward_masks, drop.masks):
        assert torch.equal(a, b)
    # the gradient is that of the function with exactly those masks
    drop.fixed = torch.cat(forward_masks)
    want = chunkconv.dynamic_conv_reference(x, gen, out_channels=4, kernel_size=3, padding=1)
    torch.testing.assert_close(y, want)
    for g, w in zip(grads, torch.autograd.grad(want, [x, *gen.parameters()], upstream)):
        torch.testing.assert_close(g, w)


def test_parameters_are_explicit_autograd_inputs():
    gen = mlp_generator(SPEC)
    conv = chunkconv.DynamicConv(gen, 3, 4, 3, padding=1, dtype=torch.float64, chunk_size=5)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = gen[0].weight
    (g,) = torch.autograd.grad(conv(x).sum(), [weight])
    assert g.shape == weight.shape and g.abs().sum() > 0

    seen = []
    weight.register_hook(lambda grad: seen.append(grad.clone()))
    conv(x).sum().backward(inputs=[weight])
    assert x.grad is None and gen[2].weight.grad is None and conv.bias.grad is None
    torch.testing.assert_close(weight.grad, g)
    assert len(seen) == 1


def test_only_requested_gradients_are_computed():
    gen = mlp_generator(SPEC)
    gen.requires_grad_(False)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=3)
    y.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in gen.parameters())


def test_no_grad_and_inference_mode_keep_nothing():
    gen = mlp_generator(SPEC)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        y = chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=3)
    assert y.grad_fn is None and not y.requires_grad
    with torch.inference_mode():
        z = chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=3)
    assert z.is_inference()
    torch.testing.assert_close(y, z)


def test_forward_saves_only_the_input_and_parameters():
    gen = mlp_generator(SPEC)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=16)
    expected = {id(x), *(id(p) for p in gen.parameters())}
    assert len(saved) == len(expected)
    assert sum(t.numel() for t in saved) == x.numel() + sum(p.numel() for p in gen.parameters())


def test_plain_callable_generator():
    gen = mlp_generator(SPEC)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = chunkconv.dynamic_conv2d(x, lambda p: gen(p).detach(), 4, 3, padding=1, chunk_size=3)
    (g,) = torch.autograd.grad(y.sum(), x)
    want = chunkconv.dynamic_conv_reference(x, lambda p: gen(p).detach(), out_channels=4, kernel_size=3, padding=1)
    torch.testing.assert_close(g, torch.autograd.grad(want.sum(), x)[0])


@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 3, 5, 7)])
def test_unbatched_input_matches_batched(shape):
    gen = mlp_generator(SPEC)
    x = torch.randn(shape, dtype=torch.float64)
    y = chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=4)
    assert y.shape == (*shape[:-3], 4, 5, 7)


def test_backward_recompute_leaves_running_statistics_alone():
    gen = nn.Sequential(nn.Linear(27, 6), nn.BatchNorm1d(6), nn.Linear(6, 4 * 27)).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    y = chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=18, allow_batch_coupled=True)
    after_forward = {k: v.clone() for k, v in gen[1].state_dict().items()}
    assert after_forward["num_batches_tracked"] == 2
    y.sum().backward()
    for k, v in gen[1].state_dict().items():
        assert torch.equal(v, after_forward[k]), k


def test_inference_records_no_graph_even_through_captured_tensors():
    w = torch.randn(4 * 27, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    y = chunkconv.dynamic_conv2d(x, lambda p: p[:, :1] * w, 4, 3, padding=1, chunk_size=4)
    assert y.grad_fn is None and not y.requires_grad
