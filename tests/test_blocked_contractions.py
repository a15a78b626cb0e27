"""The structured forms' contractions with written-out gradients (blocked or not), against autograd's versions."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chunkconv import forms
from chunkconv import modulated as mod

F64 = torch.float64


def _case(rows, groups, per_channel, columns, seed=0):
    c, o, taps = 2 * groups, 3 * groups, 4
    p = c * taps
    gen = torch.Generator().manual_seed(seed)
    patches = (
        torch.randn(p, rows, dtype=F64, generator=gen).t()
        if columns
        else torch.randn(rows, p, dtype=F64, generator=gen)
    )
    scale = torch.randn(rows, p if per_channel else taps, dtype=F64, generator=gen)
    weight = torch.randn(o, p // groups, dtype=F64, generator=gen)
    return patches, scale, weight


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("block_bytes", [mod._BLOCK_BYTES, 2 * 8 * 8 * 2])  # one block; blocks of 2 locations
def test_forward_and_gradients_match_autograds_composition(monkeypatch, groups, per_channel, columns, block_bytes):
    monkeypatch.setattr(mod, "_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(mod, "_MIN_BLOCK_LOCATIONS", 1)
    patches, scale, weight = _case(13, groups, per_channel, columns)
    grad = torch.randn(13, weight.shape[0], dtype=F64)
    leaves = [t.clone().requires_grad_() for t in (patches, scale, weight)]
    if columns:  # clone() keeps the columns' strides
        assert leaves[0].stride() == (1, 13)
    expected = mod.modulate_composed(*leaves, groups, columns)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    with torch.no_grad():
        torch.testing.assert_close(mod.modulate(patches, scale, weight, groups, columns), expected, rtol=0, atol=1e-12)
    got_leaves = [t.clone().requires_grad_() for t in (patches, scale, weight)]
    for values in (True, False):
        out = mod.modulate(*got_leaves, groups, columns, values=values)
        assert "ModulatedContraction" in type(out.grad_fn).__name__
        assert out.shape == expected.shape and out.stride() == expected.stride()
        if values:
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        got = torch.autograd.grad(out, got_leaves, grad)
        assert got[0].stride() == patches.stride()  # in the patches' layout
        for g, e in zip(got, expected_grads):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("columns", [True, False])
def test_only_the_wanted_gradients_are_made(columns):
    patches, scale, weight = _case(7, 2, False, columns)
    grad = torch.randn(7, weight.shape[0], dtype=F64)
    # GEMMs in backward (one block, two groups): W^T g for the patches' or the scalars' gradient; grad W
    for wanted, gemms in zip(range(3), (2, 2, 2)):
        leaves = [t.clone().requires_grad_(i == wanted) for i, t in enumerate((patches, scale, weight))]
        reference = [t.clone().requires_grad_(i == wanted) for i, t in enumerate((patches, scale, weight))]
        out = mod.modulate(*leaves, 2, columns, values=False)
        with _CountOps() as counted:
            (got,) = torch.autograd.grad(out, [leaves[wanted]], grad)
        assert counted.gemms == gemms
        assert counted.products == 1  # gs * s; gs * x (then summed); x * s
        (expected,) = torch.autograd.grad(mod.modulate_composed(*reference, 2, columns), [reference[wanted]], grad)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.gemms = self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        self.gemms += func.overloadpacket in (aten.mm, aten.addmm, aten.addmm_)
        self.products += func.overloadpacket in (aten.mul, aten.mul_)
        return func(*args, **(kwargs or {}))


def test_a_block_is_never_smaller_than_the_planners_largest_probe():
    # below it, memory would stop growing with the locations between two probes, and the planner's
    # line through the probes would under-count the chunks in between
    from chunkconv.measure import PROBE_ROWS

    assert mod._MIN_BLOCK_LOCATIONS >= max(PROBE_ROWS["cpu"])


def test_the_users_tensors_are_not_modified():
    patches, scale, weight = _case(9, 2, True, True)
    before = [t.clone() for t in (patches, scale, weight)]
    leaves = [t.requires_grad_() for t in (patches, scale, weight)]
    torch.autograd.grad(mod.modulate(*leaves, 2, True), leaves, torch.ones(9, weight.shape[0], dtype=F64))
    for t, b in zip((patches, scale, weight), before):
        assert torch.equal(t.detach(), b)


def test_half_precision_and_autocast_take_autograds_composition():
    patches, scale, weight = _case(5, 1, False, False)
    half = [t.to(torch.bfloat16).requires_grad_() for t in (patches, scale, weight)]
    assert "ModulatedContraction" not in type(mod.modulate(*half, 1, False).grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod.modulate(*(t.float().requires_grad_() for t in (patches, scale, weight)), 1, False)
    assert "ModulatedContraction" not in type(out.grad_fn).__name__


@pytest.mark.parametrize("columns", [True, False])
def test_an_empty_chunk(columns):
    patches, scale, weight = _case(0, 1, False, columns)
    with torch.no_grad():
        assert mod.modulate(patches, scale, weight, 1, columns).shape == (0, weight.shape[0])
    leaves = [t.requires_grad_() for t in (patches, scale, weight)]
    grads = torch.autograd.grad(mod.modulate(*leaves, 1, columns), leaves, torch.ones(0, weight.shape[0], dtype=F64))
    assert grads[2].abs().max() == 0


# The shared form's depthwise product: (patches * kernels).sum(taps), kernels broadcast over a group's channels


@pytest.mark.parametrize("columns", [True, False])
def test_depthwise_forward_and_gradients_match_autograds_composition(columns):
    rows, g, per_group, taps = 11, 2, 3, 5
    gen = torch.Generator().manual_seed(1)
    if columns:  # (G, C / G, K, B) x (G, 1, K, B), summed over the taps
        shape_p, shape_k, dims = (g, per_group, taps, rows), (g, 1, taps, rows), (2, 1)
    else:  # (B, G, C / G, K) x (B, G, 1, K)
        shape_p, shape_k, dims = (rows, g, per_group, taps), (rows, g, 1, taps), (3, 2)
    patches = torch.randn(shape_p, dtype=F64, generator=gen, requires_grad=True)
    kernels = torch.randn(shape_k, dtype=F64, generator=gen, requires_grad=True)
    expected = (patches * kernels).sum(dims[0])
    grad = torch.randn(expected.shape, dtype=F64, generator=gen)
    expected_grads = torch.autograd.grad(expected, (patches, kernels), grad)
    for values in (True, False):
        out = forms._Depthwise.apply(patches, kernels, *dims, values)
        if values:
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        for got, e in zip(torch.autograd.grad(out, (patches, kernels), grad), expected_grads):
            torch.testing.assert_close(got, e, rtol=0, atol=1e-12)
