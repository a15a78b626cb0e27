"""Where a chunk's rows live: index blocks, and the streams that read and write them.

A chunk is a range of the flat ``N * L`` location index, so a chunk may span several images and
no size has to divide another. This module turns a range into a few rectangular blocks of
``(N, *out_spatial)`` (:class:`ChunkIndex`), and owns the per-location inputs a step consumes,
one :class:`Stream` each: today the input's patches (:class:`PatchStream`), copied out of a
strided view of the padded input so that the whole unfold never exists, with their gradients
added back one kernel tap at a time. A stream reads a chunk's rows (``gather``), receives their
gradients in backward (``add_grad``) and maps the summed gradient back onto its source tensor
(``grad``); the executor handles every stream alike.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import ConvGeometry

__all__ = [
    "Block",
    "ChunkIndex",
    "PatchStream",
    "Stream",
    "STREAM_KINDS",
    "blockwise",
    "gather_patches",
    "make_streams",
    "pad_input",
    "range_blocks",
    "scatter_patch_grads",
]


def pad_input(x: Tensor, geom: ConvGeometry) -> Tensor:
    """``x`` padded as ``nn.Conv*d`` pads it for ``padding_mode`` (``x`` itself if unpadded)."""
    if not geom.is_padded:
        return x
    mode = "constant" if geom.padding_mode == "zeros" else geom.padding_mode
    return F.pad(x, geom.torch_pad, mode=mode)


Block = tuple[int | slice, ...]


def range_blocks(start: int, end: int, sizes: Sequence[int]) -> list[Block]:
    """The flat row-major range ``[start, end)`` over ``sizes`` as rectangular index blocks.

    A range of rows is a partial row, whole rows and a partial row; one dimension up, the same
    over planes; so at most ``2 * len(sizes) - 1`` blocks, each a plain (strided) slice of a
    tensor of shape ``sizes``, in order.
    """
    if start >= end:
        return []
    if len(sizes) == 1:
        return [(slice(start, end),)]
    inner = math.prod(sizes[1:])
    first, last = start // inner, (end - 1) // inner
    if first == last:
        return [(first, *b) for b in range_blocks(start - first * inner, end - first * inner, sizes[1:])]
    head: list[Block] = []
    if start > first * inner:
        head = [(first, *b) for b in range_blocks(start - first * inner, inner, sizes[1:])]
        first += 1
    tail: list[Block] = []
    if end < (last + 1) * inner:
        tail = [(last, *b) for b in range_blocks(0, end - last * inner, sizes[1:])]
        last -= 1
    whole = [(slice(first, last + 1), *(slice(None),) * (len(sizes) - 1))] if first <= last else []
    return head + whole + tail


@dataclass(frozen=True)
class ChunkIndex:
    """The locations of one chunk, as rectangular blocks rather than index tensors.

    ``cells`` index ``(N, *out_spatial)`` (patches, and input-gradient taps); ``rows`` index
    ``(N, L)`` (output rows). Copying blocks out of strided views is several times faster than
    advanced indexing and allocates no index vectors.
    """

    start: int
    end: int
    cells: tuple[Block, ...]
    rows: tuple[Block, ...]

    @classmethod
    def build(cls, start: int, end: int, geom: ConvGeometry) -> ChunkIndex:
        cells = range_blocks(start, end, (geom.batch, *geom.out_spatial))
        rows = range_blocks(start, end, (geom.batch, geom.locations_per_image))
        return cls(start, end, tuple(cells), tuple(rows))


def blockwise(view: Tensor, blocks: Sequence[Block], flat: Tensor, mode: str) -> None:
    """Move data between a chunk's rows ``flat`` ``(B, *item)`` and its ``blocks`` of ``view``.

    ``mode``: ``"read"`` copies the blocks into ``flat``; ``"write"`` copies ``flat`` into the
    blocks; ``"add"`` adds it to them (blocks never overlap, so no element is added twice).
    """
    pos, item = 0, max(1, math.prod(flat.shape[1:]))
    for block in blocks:
        part = view[block]
        n = part.numel() // item
        rows = flat[pos : pos + n].view(part.shape)
        if mode == "read":
            rows.copy_(part)
        elif mode == "write":
            part.copy_(rows)
        else:
            part.add_(rows)
        pos += n


def _patch_view(x_pad: Tensor, geom: ConvGeometry) -> Tensor:
    """A zero-copy view ``(N, *out_spatial, C, *kernel_size)`` of every patch.

    Patches overlap in memory, so this view is read-only in spirit; it is only
    ever indexed, which copies the selected patches out.
    """
    s_n, s_c, *s_sp = x_pad.stride()
    size = (geom.batch, *geom.out_spatial, geom.in_channels, *geom.kernel_size)
    stride = (
        s_n,
        *(st * s for st, s in zip(geom.stride, s_sp)),
        s_c,
        *(dil * s for dil, s in zip(geom.dilation, s_sp)),
    )
    return x_pad.as_strided(size, stride)


def gather_patches(x_pad: Tensor, chunk: ChunkIndex, geom: ConvGeometry) -> Tensor:
    """The chunk's patches as generator rows ``(B, C * prod(kernel_size))``, ``F.unfold`` order."""
    out = torch.empty(chunk.end - chunk.start, geom.patch_size, dtype=x_pad.dtype, device=x_pad.device)
    blockwise(_patch_view(x_pad, geom), chunk.cells, out, "read")
    # A view, not the buffer: autocast caches its casts of leaves that require grad and are not
    # views for as long as its region lasts (all of backward's replay), so returning the buffer
    # would keep a low-precision copy of every chunk's patches alive until backward ends.
    return out.view(out.shape)


def scatter_patch_grads(grad_pad: Tensor, grad_patches: Tensor, chunk: ChunkIndex, geom: ConvGeometry) -> None:
    """Add patch gradients ``(B, C * K)`` into ``grad_pad`` (contiguous, padded shape).

    One kernel tap at a time: for a fixed tap the map from location to input
    element is injective, so each write is a plain accumulate without aliasing.
    """
    s_n, s_c, *s_sp = grad_pad.stride()
    size = (geom.batch, *geom.out_spatial, geom.in_channels)
    stride = (s_n, *(st * s for st, s in zip(geom.stride, s_sp)), s_c)
    per_tap = grad_patches.view(-1, geom.in_channels, geom.kernel_numel)
    taps = itertools.product(*(range(k) for k in geom.kernel_size))
    for t, tap in enumerate(taps):
        offset = sum(k * dil * s for k, dil, s in zip(tap, geom.dilation, s_sp))
        view = grad_pad.as_strided(size, stride, grad_pad.storage_offset() + offset)
        blockwise(view, chunk.cells, per_tap[:, :, t], "add")


class Stream(Protocol):
    """One per-location input of a step, read chunk by chunk (see the module docstring).

    ``requires_grad``: whether backward wants this stream's gradient.
    """

    requires_grad: bool

    def gather(self, chunk: ChunkIndex) -> Tensor: ...

    def add_grad(self, chunk: ChunkIndex, grad: Tensor) -> None: ...

    def grad(self) -> Tensor | None: ...


class PatchStream:
    """The input's patches: rows ``(B, C * prod(kernel_size))`` in ``F.unfold`` order.

    ``input_grad`` (backward only): keep a padded gradient buffer, to which each chunk's patch
    gradients are added; :meth:`grad` maps it back through the padding.
    """

    def __init__(self, x: Tensor, geom: ConvGeometry, *, input_grad: bool = False) -> None:
        self.geom = geom
        self.requires_grad = input_grad
        if input_grad:
            self._leaf = x.detach().requires_grad_()
            self._padded = pad_input(self._leaf, geom)
            self.source = self._padded.detach()
            self._grad_pad: Tensor | None = torch.zeros(self.source.shape, dtype=x.dtype, device=x.device)
        else:
            self.source = pad_input(x.detach(), geom)
            self._grad_pad = None

    def gather(self, chunk: ChunkIndex) -> Tensor:
        return gather_patches(self.source, chunk, self.geom)

    def add_grad(self, chunk: ChunkIndex, grad: Tensor) -> None:
        assert self._grad_pad is not None
        scatter_patch_grads(self._grad_pad, grad.to(self._grad_pad.dtype), chunk, self.geom)

    def grad(self) -> Tensor | None:
        if self._grad_pad is None:
            return None
        if self._padded is self._leaf:
            return self._grad_pad
        return torch.autograd.grad(self._padded, self._leaf, self._grad_pad)[0]


# The kinds of stream a call can consume, by name (the order of a call's sources).
STREAM_KINDS: dict[str, type[PatchStream]] = {"patches": PatchStream}


def make_streams(
    kinds: Sequence[str], sources: Sequence[Tensor], geom: ConvGeometry, grads: Sequence[bool] | None = None
) -> list[Stream]:
    """One stream per source tensor; ``grads`` (backward) says which must collect a gradient."""
    wants = grads if grads is not None else [False] * len(sources)
    return [STREAM_KINDS[k](t, geom, input_grad=g) for k, t, g in zip(kinds, sources, wants)]
