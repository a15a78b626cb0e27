"""The deformable oracle, the streamed sampler and chunkconv.ops against torchvision's ``deform_conv2d`` (optional).

The ops' worst errors against torchvision are printed (``pytest -s``) so that they can be reported.

Skipped where torchvision does not load: PyPI's torchvision wheels pair only with the CUDA build of
torch, so CI's default run (the CPU build) tests against the project's own float64 oracle only.
To run these, make a separate environment (a multi-GB download that also runs on the CPU)::

    python -m venv /tmp/venv-tv && /tmp/venv-tv/bin/pip install torch torchvision psutil pytest hypothesis
    PYTHONPATH=$PWD /tmp/venv-tv/bin/python -m pytest -q tests/test_deform_torchvision.py
"""

from __future__ import annotations

import math

import pytest
import torch

import chunkconv.ops
from chunkconv.deform_reference import deform_conv_reference
from chunkconv.gather import ChunkIndex
from chunkconv.geometry import conv_spec
from chunkconv.sampling import DeformPatchStream, torchvision_offsets

try:
    from torchvision.ops import DeformConv2d as TVDeformConv2d
    from torchvision.ops import deform_conv2d
except (ImportError, OSError, RuntimeError) as exc:  # absent, or built for another torch
    pytest.skip(f"torchvision does not load here: {exc}", allow_module_level=True)

F64 = torch.float64


def stream_conv(x, offset, weight, stride, padding, dilation, mask, chunk_size, upstream=None):
    """deform_conv2d built from the stream: the sampled rows contracted with the grouped weight."""
    n, c = x.shape[:2]
    o, cg = weight.shape[:2]
    groups, ks = c // cg, tuple(weight.shape[2:])
    spec = conv_spec(
        2, in_channels=c, out_channels=o, kernel_size=ks, stride=stride, padding=padding, dilation=dilation
    )
    geom = spec.geometry(x.shape)
    canon, cmask = torchvision_offsets(offset, mask, ks)
    wants = upstream is not None
    stream = DeformPatchStream(
        x, canon, cmask, geom, input_grad=wants, offset_grad=wants, mask_grad=wants and mask is not None
    )
    w = weight.reshape(groups, o // groups, -1)
    outs = []
    up_rows = None if upstream is None else upstream.flatten(2).transpose(1, 2).reshape(-1, o)
    for start in range(0, geom.num_patches, chunk_size):
        chunk = ChunkIndex.build(start, min(start + chunk_size, geom.num_patches), geom)
        rows = stream.gather(chunk).reshape(-1, groups, cg * math.prod(ks))
        outs.append(torch.einsum("bgp,gop->bgo", rows, w).reshape(-1, o))
        if wants:
            up = up_rows[chunk.start : chunk.end].reshape(-1, groups, o // groups)
            stream.add_grad(chunk, torch.einsum("bgo,gop->bgp", up, w).reshape(len(rows), -1))
    y = torch.cat(outs).reshape(n, -1, o).transpose(1, 2).reshape(n, o, *geom.out_spatial)
    return y, (stream.grads() if wants else None)


CASES = [
    # (N, C, H, W), O, groups, offset groups, kernel, stride, padding, dilation, mask
    ((2, 4, 7, 6), 6, 2, 1, (3, 3), (1, 1), (1, 1), (1, 1), True),
    ((1, 6, 8, 9), 4, 2, 3, (3, 2), (2, 1), (0, 2), (1, 2), True),
    ((3, 2, 5, 5), 2, 1, 2, (2, 3), (1, 2), (2, 1), (2, 1), False),
    ((1, 4, 6, 7), 8, 4, 4, (1, 1), (1, 1), (0, 0), (1, 1), True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("scale", [0.7, 3.0, 60.0])
def test_oracle_and_stream_match_torchvision(case, scale):
    shape, o, groups, og, ks, stride, padding, dilation, masked = case
    torch.manual_seed(1)
    n, c = shape[:2]
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    weight = torch.randn(o, c // groups, *ks, dtype=F64, requires_grad=True)
    bias = torch.randn(o, dtype=F64)
    ho = (shape[2] + 2 * padding[0] - dilation[0] * (ks[0] - 1) - 1) // stride[0] + 1
    wo = (shape[3] + 2 * padding[1] - dilation[1] * (ks[1] - 1) - 1) // stride[1] + 1
    k = ks[0] * ks[1]
    offset = (torch.randn(n, og * k * 2, ho, wo, dtype=F64) * scale).requires_grad_()
    # some samples land exactly on integers and on -1, where the gradient rules matter
    offset.data[:, ::3] = offset.data[:, ::3].round()
    mask = torch.rand(n, og * k, ho, wo, dtype=F64, requires_grad=True) if masked else None
    leaves = [x, offset, weight] + ([mask] if masked else [])
    want = deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)
    up = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves, up)

    ours = deform_conv_reference(x, offset, weight, bias, stride, padding, dilation, mask)
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("input", "offset", "weight", "mask"), torch.autograd.grad(ours, leaves, up), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"oracle {name}: {m}")

    got, (gx, goff, gmask) = stream_conv(
        x.detach(), offset.detach(), weight.detach(), stride, padding, dilation, mask, 13, up
    )
    torch.testing.assert_close(got + bias.view(1, -1, 1, 1), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, want_grads[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(goff.reshape(offset.shape), want_grads[1], rtol=1e-10, atol=1e-10)
    if masked:
        torch.testing.assert_close(gmask.reshape(mask.shape), want_grads[3], rtol=1e-10, atol=1e-10)


BORDER_POSITIONS = [(1.0, 2.0), (-1.0, 2.0), (1.0, -1.0), (3.0, 2.0), (1.0, 3.0), (3.5, 2.0), (-0.5, 2.0)]
BORDER_POSITIONS += [(4.0, 2.0), (-1.5, 2.0), (51.0, -48.0), (-1e4, 1e4), (-1.0, -1.0), (-1.0, 3.0)]


@pytest.mark.parametrize("where", BORDER_POSITIONS)
def test_the_border_table_matches_torchvision(where):
    # a 1x1 kernel of weight 1 on a 4x4 arange input, the location (1, 2) moved to `where`
    x = torch.arange(16, dtype=F64).reshape(1, 1, 4, 4).requires_grad_()
    offset = torch.zeros(1, 2, 4, 4, dtype=F64)
    offset[0, :, 1, 2] = torch.tensor(where, dtype=F64) - torch.tensor([1.0, 2.0], dtype=F64)
    offset.requires_grad_()
    mask = torch.full((1, 1, 4, 4), 0.5, dtype=F64, requires_grad=True)
    weight = torch.ones(1, 1, 1, 1, dtype=F64)
    up = torch.zeros(1, 1, 4, 4, dtype=F64)
    up[0, 0, 1, 2] = 1.0
    want = deform_conv2d(x, offset, weight, mask=mask)
    want_grads = torch.autograd.grad(want, (x, offset, mask), up)
    got, got_grads = stream_conv(x.detach(), offset.detach(), weight, (1, 1), (0, 0), (1, 1), mask.detach(), 5, up)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=0, atol=0)
    ours = deform_conv_reference(x, offset, weight, mask=mask)
    torch.testing.assert_close(ours, want, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(ours, (x, offset, mask), up), want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float32_stream_matches_torchvision():
    torch.manual_seed(2)
    x = torch.randn(1, 8, 16, 16)
    offset = torch.randn(1, 2 * 9 * 2, 16, 16) * 2
    mask = torch.rand(1, 2 * 9, 16, 16)
    weight = torch.randn(8, 8, 3, 3)
    up = torch.randn(1, 8, 16, 16)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    want = deform_conv2d(leaves[0], leaves[1], weight, padding=(1, 1), mask=leaves[2])
    want_grads = torch.autograd.grad(want, leaves, up)
    got, grads = stream_conv(x, offset, weight, (1, 1), (1, 1), (1, 1), mask, 100, up)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-4, atol=1e-4)


WORST: dict[str, float] = {}


def _worst(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    WORST[name] = max(WORST.get(name, 0.0), (a.double() - b.double()).abs().max().item())


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    for name, err in sorted(WORST.items()):
        print(f"worst |chunkconv.ops - torchvision| {name}: {err:.2e}")


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("scale", [0.7, 3.0, 60.0])
@pytest.mark.parametrize("chunk_size", [1, 17, None])
def test_the_op_matches_torchvision_in_float64(case, scale, chunk_size):
    shape, o, groups, og, ks, stride, padding, dilation, masked = case
    torch.manual_seed(1)
    n, c = shape[:2]
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    weight = torch.randn(o, c // groups, *ks, dtype=F64, requires_grad=True)
    bias = torch.randn(o, dtype=F64, requires_grad=True)
    ho = (shape[2] + 2 * padding[0] - dilation[0] * (ks[0] - 1) - 1) // stride[0] + 1
    wo = (shape[3] + 2 * padding[1] - dilation[1] * (ks[1] - 1) - 1) // stride[1] + 1
    k = ks[0] * ks[1]
    offset = (torch.randn(n, og * k * 2, ho, wo, dtype=F64) * scale).requires_grad_()
    offset.data[:, ::3] = offset.data[:, ::3].round()
    mask = torch.rand(n, og * k, ho, wo, dtype=F64, requires_grad=True) if masked else None
    leaves = [x, offset, weight, bias] + ([mask] if masked else [])
    want = deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)
    got = chunkconv.ops.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask, chunk_size=chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    _worst("float64 output", got, want)
    up = torch.randn_like(want)
    names = ("input", "offset", "weight", "bias", "mask")
    for name, a, b in zip(names, torch.autograd.grad(got, leaves, up), torch.autograd.grad(want, leaves, up)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        _worst(f"float64 {name} gradient", a, b)


@pytest.mark.parametrize("where", BORDER_POSITIONS)
def test_the_ops_border_table_is_torchvisions_bit_for_bit(where):
    x = torch.arange(16, dtype=F64).reshape(1, 1, 4, 4).requires_grad_()
    offset = torch.zeros(1, 2, 4, 4, dtype=F64)
    offset[0, :, 1, 2] = torch.tensor(where, dtype=F64) - torch.tensor([1.0, 2.0], dtype=F64)
    offset.requires_grad_()
    mask = torch.full((1, 1, 4, 4), 0.5, dtype=F64, requires_grad=True)
    weight = torch.ones(1, 1, 1, 1, dtype=F64)
    want = deform_conv2d(x, offset, weight, mask=mask)
    got = chunkconv.ops.deform_conv2d(x, offset, weight, mask=mask, chunk_size=5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    up = torch.zeros(1, 1, 4, 4, dtype=F64)
    up[0, 0, 1, 2] = 1.0
    for a, b in zip(torch.autograd.grad(got, (x, offset, mask), up), torch.autograd.grad(want, (x, offset, mask), up)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_module_loads_torchvisions_state_dict_and_computes_the_same():
    torch.manual_seed(4)
    theirs = TVDeformConv2d(8, 6, 3, stride=1, padding=1, groups=2)
    ours = chunkconv.ops.DeformConv2d(8, 6, 3, stride=1, padding=1, groups=2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 8, 12, 12)
    offset = torch.randn(2, 2 * 18, 12, 12) * 2
    mask = torch.rand(2, 18, 12, 12)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    want = theirs(leaves[0], leaves[1], leaves[2])
    got = ours(leaves[0], leaves[1], leaves[2])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _worst("float32 module output", got, want)
    up = torch.randn_like(want)
    a = torch.autograd.grad(got, [*leaves, ours.weight, ours.bias], up)
    b = torch.autograd.grad(want, [*leaves, theirs.weight, theirs.bias], up)
    for name, ga, gb in zip(("input", "offset", "mask", "weight", "bias"), a, b):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        _worst(f"float32 module {name} gradient", ga, gb)
    # the same initialisation, drawn in the same order
    torch.manual_seed(5)
    theirs = TVDeformConv2d(4, 4, 3)
    torch.manual_seed(5)
    ours = chunkconv.ops.DeformConv2d(4, 4, 3)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
