"""The fast path's patch-first contraction with its written-out gradients, against autograd's version."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chunkconv.fast import patch_first as pf
from chunkconv.geometry import conv_spec

F64 = torch.float64


def _case(rows, groups, hidden, bias, columns, seed=0):
    c, o, k = 4 * groups, 3 * groups, 3
    geom = conv_spec(2, in_channels=c, out_channels=o, kernel_size=k, groups=groups).geometry((1, c, 8, 8))
    gen = torch.Generator().manual_seed(seed)
    pg, og = geom.patch_size // groups, o // groups
    width = og * (hidden + 1 if bias else hidden)
    patches = torch.randn(geom.patch_size, rows, dtype=F64, generator=gen).t() if columns else None
    if patches is None:
        patches = torch.randn(rows, geom.patch_size, dtype=F64, generator=gen)
    h = torch.randn(rows, hidden, dtype=F64, generator=gen)
    weight = torch.randn(groups, pg, width, dtype=F64, generator=gen)
    return geom, patches, h, weight


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("block_bytes", [pf._BLOCK_BYTES, 300, 500])  # one block; 2, and 3 or 4 rows
def test_forward_and_gradients_match_autograds_composition(monkeypatch, groups, bias, columns, block_bytes):
    monkeypatch.setattr(pf, "_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(pf, "_MIN_BLOCK_ROWS", 1)
    geom, patches, h, weight = _case(23, groups, 5, bias, columns)
    row_bytes = weight.shape[-1] * 8  # 15 or 18 float64 values: 23 rows leave a shorter last block
    assert pf._block_rows(patches, weight.shape[-1]) == min(23, block_bytes // row_bytes)
    grad = torch.randn(23, geom.out_channels, dtype=F64)
    leaves = [t.clone().requires_grad_() for t in (patches, h, weight)]
    expected = pf.patch_first_composed(*leaves, geom)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    with torch.no_grad():
        torch.testing.assert_close(pf.patch_first(patches, h, weight, geom), expected, rtol=1e-12, atol=1e-12)
    got_leaves = [t.clone().requires_grad_() for t in (patches, h, weight)]
    for values in (True, False):
        out = pf.patch_first(*got_leaves, geom, values=values)
        assert out.grad_fn is not None and "PatchFirstContraction" in type(out.grad_fn).__name__
        if values:
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(out, got_leaves, grad)
        assert got[0].stride() == patches.stride()  # in the patches' layout
        for g, e in zip(got, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


class _CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        gemms = (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.baddbmm_)
        self.calls += func.overloadpacket in gemms
        return func(*args, **(kwargs or {}))


def test_only_the_wanted_gradients_are_made():
    geom, patches, h, weight = _case(9, 1, 4, True, False)
    grad = torch.randn(9, geom.out_channels, dtype=F64)
    # GEMMs in backward (one block, one group): T and grad h'; grad x; grad W
    for wanted, gemms in zip(range(3), (1, 2, 1)):
        leaves = [t.clone().requires_grad_(i == wanted) for i, t in enumerate((patches, h, weight))]
        reference = [t.clone().requires_grad_(i == wanted) for i, t in enumerate((patches, h, weight))]
        out = pf.patch_first(*leaves, geom, values=False)
        with _CountGemms() as counted:
            (got,) = torch.autograd.grad(out, [leaves[wanted]], grad)
        assert counted.calls == gemms
        (expected,) = torch.autograd.grad(pf.patch_first_composed(*reference, geom), [reference[wanted]], grad)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])  # without a bias, h' is h itself
def test_the_users_tensors_are_not_modified(bias):
    geom, patches, h, weight = _case(11, 2, 3, bias, True)
    before = [t.clone() for t in (patches, h, weight)]
    with torch.no_grad():
        pf.patch_first(patches, h, weight, geom)
    leaves = [t.requires_grad_() for t in (patches, h, weight)]
    torch.autograd.grad(pf.patch_first(*leaves, geom), leaves, torch.ones(11, geom.out_channels, dtype=F64))
    for t, b in zip((patches, h, weight), before):
        assert torch.equal(t.detach(), b)


def test_half_precision_and_autocast_take_autograds_composition():
    geom, patches, h, weight = _case(6, 1, 4, True, False)
    half = [t.to(torch.bfloat16).requires_grad_() for t in (patches, h, weight)]
    out = pf.patch_first(*half, geom)
    assert "PatchFirstContraction" not in type(out.grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pf.patch_first(*(t.float().requires_grad_() for t in (patches, h, weight)), geom)
    assert "PatchFirstContraction" not in type(out.grad_fn).__name__


def test_an_empty_chunk():
    geom, patches, h, weight = _case(0, 1, 4, True, False)
    with torch.no_grad():
        assert pf.patch_first(patches, h, weight, geom).shape == (0, geom.out_channels)
    leaves = [t.requires_grad_() for t in (patches, h, weight)]
    out = pf.patch_first(*leaves, geom)
    grads = torch.autograd.grad(out, leaves, torch.ones(0, geom.out_channels, dtype=F64))
    assert grads[2].abs().max() == 0


def test_a_wide_t_keeps_blocks_of_gemm_size():
    wide = torch.empty(10_000, 8)  # a block of 4 MiB would be 4 rows of a T 2**18 values wide
    assert pf._block_rows(wide, 1 << 18) == pf._MIN_BLOCK_ROWS
    assert pf._block_rows(torch.empty(100, 8), 1 << 18) == 100


def test_a_block_is_never_smaller_than_the_planners_largest_probe():
    # below it, memory would stop growing with the rows between two probes, and the planner's line
    # through the probes would under-count the chunks in between
    from chunkconv.measure import PROBE_ROWS

    assert pf._MIN_BLOCK_ROWS >= max(PROBE_ROWS["cpu"])
