"""The ``"patch_first"`` contraction in PyTorch, with its gradients written out.

``T = x_g @ W_g`` (``(B, Og * H')`` per group), then ``out[b, o] = sum_j T[b, o, j] * h'[b, j]``,
where ``h' = [h, 1]`` when the bias is folded into ``W`` (:meth:`~.backends.TorchBackend.prepare`).
Left to autograd, the second step is a batched ``(Og, H') @ (H', 1)`` product per row, and its
backward forms the outer product ``g (x) h'`` the same way; both run at a few percent of the
machine's GEMM rate and were a third of the fast path's CPU time. Here:

* without grad (the forward of every call), ``T`` is made a block of rows at a time, kept in the
  CPU's caches, and multiplied by ``h'`` in place and summed;
* with grad, :class:`PatchFirstContraction` saves only its inputs, and its backward makes ``T``
  again a block at a time, with the gradients as broadcast products and GEMMs on the same block.
  In backward's recompute (``values=False``) its forward then does no work: the output's values
  are never read there.

Half precision, autocast and mixed dtypes are left to the autograd-composed version
(:func:`patch_first_composed`), which is also the reference the tests hold this one to.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..geometry import ConvGeometry

__all__ = ["PatchFirstContraction", "patch_first", "patch_first_composed"]

# Bytes of T made at a time on the CPU: a block stays in the caches between the GEMM that writes
# it and the products that read it (on the project's 2-core CPU, blocks of 2048-4096 rows of
# O * H' = 528 float32 were ~20% faster than whole chunks). On a GPU a chunk is one block.
_BLOCK_BYTES = 4 << 20
# A block keeps at least this many rows: a wide T's GEMMs stay GEMMs, and, being no fewer than the
# planner's largest CPU probe (chunkconv.measure.PROBE_ROWS), a chunk's memory grows linearly with
# its rows over every probe, so the planner's line through the probes never under-counts a chunk
# (past one block it over-counts). tests/test_patch_first.py holds the two together.
_MIN_BLOCK_ROWS = 1024


def patch_first(patches: Tensor, h: Tensor, weight: Tensor, geom: ConvGeometry, *, values: bool = True) -> Tensor:
    """One chunk's output ``(B, O)`` from patches ``(B, P)``, ``h`` ``(B, H)`` and ``W`` ``(G, Pg, Og * H')``.

    ``values=False`` (backward's recompute): the graph is built, and the output's values may be left unset.
    """
    if (
        torch.is_autocast_enabled(patches.device.type)
        or not patches.dtype == h.dtype == weight.dtype
        or patches.element_size() < 4  # half precision: bmm's products are not rounded to it
    ):
        return patch_first_composed(patches, h, weight, geom)
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (patches, h, weight))
    if not grads:
        return _blocked_forward(patches, h, weight, geom.out_channels)
    out: Tensor = PatchFirstContraction.apply(patches, h, weight, geom.out_channels, values)
    return out


def patch_first_composed(patches: Tensor, h: Tensor, weight: Tensor, geom: ConvGeometry) -> Tensor:
    """The same contraction as autograd composes it: ``T = x_g @ W_g``, then ``bmm(T, h')`` per row."""
    rows, g = patches.shape[0], geom.groups
    og, pg = geom.out_channels // g, geom.patch_size // g
    h1 = _with_ones(h, weight.shape[-1] // og).unsqueeze(-1)  # (B, H', 1)
    width = h1.shape[1]
    outs = [torch.bmm((patches[:, k * pg : (k + 1) * pg] @ weight[k]).view(rows, og, width), h1) for k in range(g)]
    out = outs[0] if g == 1 else torch.cat(outs, dim=1)
    return out.view(rows, geom.out_channels)


def _with_ones(h: Tensor, width: int) -> Tensor:
    """``h' = [h, 1]`` when ``W`` carries the folded bias (``width = H + 1``), else ``h``."""
    return h if width == h.shape[1] else torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)


def _block_rows(like: Tensor, width: int) -> int:
    """Rows of ``like`` per block: ``width`` values per row in about :data:`_BLOCK_BYTES` (on the CPU)."""
    rows = like.shape[0]
    if like.device.type != "cpu":
        return max(1, rows)
    return max(1, min(rows, max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // (width * like.element_size()))))


def _blocked_forward(patches: Tensor, h: Tensor, weight: Tensor, out_channels: int) -> Tensor:
    """The output, ``T`` made and reduced a cache-sized block of rows at a time (no autograd)."""
    rows, g = patches.shape[0], weight.shape[0]
    pg, width = weight.shape[1], weight.shape[2]
    og = out_channels // g
    h1 = _with_ones(h, width // og)
    out = patches.new_empty(rows, out_channels)
    buffer = patches.new_empty(_block_rows(patches, width), width)
    block = buffer.shape[0]
    for start in range(0, rows, block):
        end = min(start + block, rows)
        t = buffer[: end - start]
        hb = h1[start:end].unsqueeze(1)  # (b, 1, H')
        for k in range(g):
            torch.mm(patches[start:end, k * pg : (k + 1) * pg], weight[k], out=t)
            product = t.view(end - start, og, -1).mul_(hb)
            torch.sum(product, dim=-1, out=out[start:end, k * og : (k + 1) * og])
    return out


class PatchFirstContraction(torch.autograd.Function):
    """``out = (x_g @ W_g) . h'`` with hand-written gradients (no double backward: chunkconv refuses it).

    Saves only its inputs: backward makes ``T`` again, a cache-sized block of rows at a time,
    together with everything that reads it. Per block and group, with ``g`` the output's gradient:
    ``T = x @ W``, ``grad h' = sum_o g[o] T[o, :]``, ``U = g (x) h'`` (a broadcast product),
    ``grad W += x^T @ U`` and ``grad x = U @ W^T``. The forward under grad (backward's recompute,
    ``values=False``) then does no work at all, and on the CPU a chunk larger than a block never
    holds a whole ``T``.
    """

    @staticmethod
    def forward(ctx: Any, patches: Tensor, h: Tensor, weight: Tensor, out_channels: int, values: bool) -> Tensor:
        """Save the inputs; the output ``(B, O)``, or an unset one without ``values``."""
        h1 = _with_ones(h, weight.shape[2] // (out_channels // weight.shape[0]))
        ctx.save_for_backward(patches, h1, weight)
        ctx.hidden = h.shape[1]
        if values:
            return _blocked_forward(patches, h, weight, out_channels)
        return patches.new_empty(patches.shape[0], out_channels)  # differentiated, never read

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        """The wanted gradients of the patches, ``h`` and ``W``, a block of rows at a time."""
        patches, h1, weight = ctx.saved_tensors
        rows, g = patches.shape[0], weight.shape[0]
        pg, width = weight.shape[1], weight.shape[2]
        og = grad_out.shape[1] // g
        want_x, want_h, want_w = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(patches) if want_x else None
        grad_h1 = h1.new_zeros(h1.shape) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        block = _block_rows(patches, width)
        t, u = patches.new_empty(block, width), patches.new_empty(block, og, width // og)
        for start in range(0, rows, block):
            end = min(start + block, rows)
            n = end - start
            hb = h1[start:end]
            for k in range(g):
                xk = patches[start:end, k * pg : (k + 1) * pg]
                gk = grad_out[start:end, k * og : (k + 1) * og]
                if grad_h1 is not None:  # sum_o g[b, o] T[b, o, :]
                    tk = torch.mm(xk, weight[k], out=t[:n]).view(n, og, -1)
                    grad_h1[start:end].unsqueeze(1).baddbmm_(gk.unsqueeze(1), tk)
                if grad_x is None and grad_w is None:
                    continue
                uk = torch.mul(gk.unsqueeze(2), hb.unsqueeze(1), out=u[:n]).view(n, width)  # g (x) h'
                if grad_w is not None:
                    grad_w[k].addmm_(xk.t(), uk)
                if grad_x is not None:
                    torch.mm(uk, weight[k].t(), out=grad_x[start:end, k * pg : (k + 1) * pg])
        grad_h = None if grad_h1 is None else grad_h1[:, : ctx.hidden]
        return grad_x, grad_h, grad_w, None, None
