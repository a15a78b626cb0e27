"""The modulated form's contraction a cache-sized block of locations at a time, gradients written out.

``out[b] = W @ (x[b] * s[b])`` for each location ``b`` of a chunk: the patch ``x[b]`` ``(C, K)``
scaled by the generated per-tap (``(1, K)``) or per-channel-and-tap (``(C, K)``) scalars ``s[b]``,
then one GEMM with the static weight ``W`` ``(O, C / G * K)`` per group. Composed by autograd,
every step but the GEMMs is a pass over the chunk's whole patch matrix in memory (the scaling,
its gradient, the scalars' gradient as a product and a sum, the scaling again in backward), and the
patches' gradient GEMM has an inner dimension of only ``O``: on the CPU these passes were most of
a DCNv2-mask layer's training step. Here each block of locations is scaled, multiplied and
differentiated while it is in the caches:

* without grad: ``scaled = x * s``, ``out = W @ scaled``, block by block;
* with grad, :class:`ModulatedContraction` saves only its inputs; backward, per block,
  ``gs = W^T g``, ``grad x = gs * s``, ``grad s = sum_c gs * x`` (per-tap scalars) or ``gs * x``,
  and ``grad W += g scaled^T``. Backward's recompute (``values=False``) does no work in forward.

The patch matrix comes in either layout of :mod:`.gather` (rows ``(B, P)``, or columns: the
transpose of a contiguous ``(P, B)``); the output comes back in the same orientation as before
(columns: the transpose of a contiguous ``(O, B)``). Half precision, autocast and mixed dtypes take
the autograd-composed version (:func:`modulate_composed`), the reference the tests hold this to.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["ModulatedContraction", "modulate", "modulate_composed"]

# Bytes of one block's patch matrix on the CPU: its scaled copy and gradient stay in the caches
# between the passes that write and read them. On a GPU a chunk is one block.
_BLOCK_BYTES = 2 << 20
# A block keeps at least this many locations: wide patches' GEMMs stay GEMMs, and, being no fewer
# than the planner's largest CPU probe (chunkconv.measure.PROBE_ROWS), a chunk's memory grows
# linearly with its locations over every probe, so the planner's line through the probes never
# under-counts a chunk. tests/test_blocked_contractions.py holds the two together.
_MIN_BLOCK_LOCATIONS = 1024


def modulate(
    patches: Tensor, scale: Tensor, weight: Tensor, groups: int, columns: bool, *, values: bool = True
) -> Tensor:
    """One chunk's output ``(B, O)`` from patches ``(B, C * K)``, scalars ``(B, K)`` or ``(B, C * K)`` and ``W``.

    ``W`` is ``(O, C / G * K)``; ``columns``: the patches are the transpose of a contiguous ``(C * K, B)``.

    ``values=False`` (backward's recompute): the graph is built, and the output's values may be left unset.
    """
    if (
        torch.is_autocast_enabled(patches.device.type)
        or not patches.dtype == scale.dtype == weight.dtype
        or patches.element_size() < 4
    ):
        return modulate_composed(patches, scale, weight, groups, columns)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (patches, scale, weight))):
        return _Blocks(patches, scale, weight, groups, columns).forward()
    out: Tensor = ModulatedContraction.apply(patches, scale, weight, groups, columns, values)
    return out


def modulate_composed(patches: Tensor, scale: Tensor, weight: Tensor, groups: int, columns: bool) -> Tensor:
    """The same contraction as autograd composes it (the form's original code)."""
    rows, p, out = patches.shape[0], patches.shape[1], weight.shape[0]
    taps = scale.shape[1] if scale.shape[1] != p else None
    per_group = p // groups
    if columns:  # as Conv2d's im2col path: weight (O, P) @ scaled columns (P, B)
        k = taps or p  # with per-channel scalars, one "tap" per entry
        s = scale.t().contiguous().view(-1, k, rows)
        scaled = (patches.t().reshape(-1, k, rows) * s).view(p, rows)
        if groups == 1:
            return (weight @ scaled).t()
        w = weight.view(groups, out // groups, per_group)
        return torch.bmm(w, scaled.view(groups, per_group, rows)).view(out, rows).t()
    s = scale.view(rows, 1, taps) if taps else scale.view(rows, 1, p)
    scaled = (patches.view(rows, -1, s.shape[-1]) * s).view(rows, p)
    if groups == 1:
        return F.linear(scaled, weight)
    w = weight.view(groups, out // groups, per_group)
    y = torch.bmm(scaled.view(rows, groups, per_group).transpose(0, 1), w.transpose(1, 2))
    return y.transpose(0, 1).reshape(rows, out)


class _Blocks:
    """One chunk seen as blocks of locations: views of the patches, scalars and ``W`` per block.

    The patch matrix is held as ``(C', K', B)`` (columns) or ``(B, C', K')`` (rows), where
    ``K'`` is the scalars' width per channel (``K``, or ``C * K`` with ``C' = 1``), so that the
    scalars broadcast over ``C'``.
    """

    def __init__(self, patches: Tensor, scale: Tensor, weight: Tensor, groups: int, columns: bool) -> None:
        self.rows, self.p = patches.shape
        self.groups, self.columns = groups, columns
        self.out_channels = weight.shape[0]
        self.width = scale.shape[1]  # K'
        self.x, self.s = self.patch_view(patches), self.scale_view(scale)
        self.weight = weight
        self.loc = 2 if columns else 0  # the locations' dimension of x and s
        self.channel = 0 if columns else 1
        if patches.device.type != "cpu":
            self.block = max(1, self.rows)
        else:
            per_block = max(_MIN_BLOCK_LOCATIONS, _BLOCK_BYTES // (self.p * patches.element_size()))
            self.block = max(1, min(self.rows, per_block))

    def patch_view(self, t: Tensor) -> Tensor:
        """A patch-shaped ``(B, P)`` tensor (the patches, or their gradient) as ``(C', K', B)`` or ``(B, C', K')``.

        A view: gradients are written through it.
        """
        channels = self.p // self.width  # C' (1 with per-channel scalars)
        return t.t().view(channels, self.width, self.rows) if self.columns else t.view(self.rows, channels, self.width)

    def scale_view(self, t: Tensor) -> Tensor:
        """A scalar-shaped ``(B, K')`` tensor (the scalars, or their gradient) as ``(1, K', B)`` or ``(B, 1, K')``."""
        return t.t().unsqueeze(0) if self.columns else t.view(self.rows, 1, self.width)

    def ranges(self) -> range:
        """The first location of every block."""
        return range(0, self.rows, self.block)

    def flat(self, t: Tensor) -> Tensor:
        """A block's ``(C', K', n)`` or ``(n, C', K')`` tensor as its ``(P, n)`` or ``(n, P)`` matrix."""
        return t.reshape(self.p, -1) if self.columns else t.reshape(-1, self.p)

    def gemm(self, scaled: Tensor, out: Tensor) -> None:
        """``out = W @ scaled`` per group, for a block: ``out`` is ``(O, n)`` (columns) or ``(n, O)``."""
        g, o, w = self.groups, self.out_channels, self.weight
        og, pg = o // g, self.p // g
        m = self.flat(scaled)
        for k in range(g):
            wk = w[k * og : (k + 1) * og]  # (Og, Pg)
            if self.columns:
                torch.mm(wk, m[k * pg : (k + 1) * pg], out=out[k * og : (k + 1) * og])
            else:
                torch.mm(m[:, k * pg : (k + 1) * pg], wk.t(), out=out[:, k * og : (k + 1) * og])

    def forward(self) -> Tensor:
        """The output ``(B, O)`` without autograd (columns: the transpose of a contiguous ``(O, B)``)."""
        o = self.out_channels
        out = self.x.new_empty((o, self.rows) if self.columns else (self.rows, o))
        for start in self.ranges():
            n = min(self.block, self.rows - start)
            scaled = self.x.narrow(self.loc, start, n) * self.s.narrow(self.loc, start, n)
            self.gemm(scaled, out.narrow(1 if self.columns else 0, start, n))
            del scaled  # before the next block's is made
        return out.t() if self.columns else out


class ModulatedContraction(torch.autograd.Function):
    """The modulated contraction with hand-written gradients, a block of locations at a time.

    Saves only its inputs; no double backward (chunkconv refuses it).
    """

    @staticmethod
    def forward(
        ctx: Any, patches: Tensor, scale: Tensor, weight: Tensor, groups: int, columns: bool, values: bool
    ) -> Tensor:
        """Save the inputs; the output ``(B, O)``, or an unset one without ``values``."""
        ctx.save_for_backward(patches, scale, weight)
        ctx.layout = (groups, columns)
        if values:
            return _Blocks(patches, scale, weight, groups, columns).forward()
        o = weight.shape[0]
        return patches.new_empty(o, patches.shape[0]).t() if columns else patches.new_empty(patches.shape[0], o)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        """The wanted gradients of the patches, the scalars and ``W``, block by block."""
        patches, scale, weight = ctx.saved_tensors
        groups, columns = ctx.layout
        b = _Blocks(patches, scale, weight, groups, columns)
        want_x, want_s, want_w = ctx.needs_input_grad[:3]
        rows, p = patches.shape
        grad_x = None
        if want_x:  # in the patches' layout
            grad_x = patches.new_empty(p, rows).t() if columns else patches.new_empty(rows, p)
        grad_s = torch.empty_like(scale) if want_s else None
        grad_w = torch.zeros_like(weight) if want_w else None
        gx = None if grad_x is None else b.patch_view(grad_x)
        gsc = None if grad_s is None else b.scale_view(grad_s)
        g = grad_out.t() if columns else grad_out  # (O, B) or (B, O)
        og, pg = weight.shape[0] // groups, b.p // groups
        for start in b.ranges():
            n = min(b.block, b.rows - start)
            x, s = b.x.narrow(b.loc, start, n), b.s.narrow(b.loc, start, n)
            gb = g.narrow(1 if columns else 0, start, n)
            if grad_x is not None or grad_s is not None:
                gs = x.new_empty(x.shape)  # the scaled patches' gradient: W^T g per group
                m = b.flat(gs)
                for k in range(groups):
                    wk = weight[k * og : (k + 1) * og]
                    if columns:
                        torch.mm(wk.t(), gb[k * og : (k + 1) * og], out=m[k * pg : (k + 1) * pg])
                    else:
                        torch.mm(gb[:, k * og : (k + 1) * og], wk, out=m[:, k * pg : (k + 1) * pg])
                if gx is not None:
                    torch.mul(gs, s, out=gx.narrow(b.loc, start, n))
                if gsc is not None:
                    torch.sum(gs.mul_(x), dim=b.channel, keepdim=True, out=gsc.narrow(b.loc, start, n))
                del gs, m
            if grad_w is not None:
                scaled = b.flat(x * s)
                for k in range(groups):
                    rows_k = slice(k * og, (k + 1) * og)
                    if columns:  # (Og, n) @ (n, Pg)
                        grad_w[rows_k].addmm_(gb[rows_k], scaled[k * pg : (k + 1) * pg].t())
                    else:  # (Og, n) @ (n, Pg)
                        grad_w[rows_k].addmm_(gb[:, rows_k].t(), scaled[:, k * pg : (k + 1) * pg])
                del scaled  # before the next block's gradient is made
        return grad_x, grad_s, grad_w, None, None, None
