"""Where a chunk's rows live: index blocks, and the streams that read and write them.

A chunk is a range of the flat ``N * L`` location index, so a chunk may span several images and
no size has to divide another. This module turns a range into a few rectangular blocks of
``(N, *out_spatial)`` (:class:`ChunkIndex`), and owns the per-location inputs a step consumes,
one :class:`Stream` each: the input's patches (:class:`PatchStream`), copied out of the padded
input chunk by chunk so that the whole unfold never exists, with their gradients added back
(folded, or one kernel tap at a time); per-location features, a guide windowed like the input,
and positions. A stream reads a chunk's rows (``gather``), receives their gradients in backward
(``add_grad``) and maps the summed gradient back onto its source tensor (``grad``); the executor
handles every stream alike.

Patch rows come in one of two memory layouts (:data:`PATCH_LAYOUTS`), the same ``(B, C * K)``
values either way: ``"rows"``, a contiguous ``(B, C * K)`` tensor, what a generator receives;
and ``"columns"``, the transpose of a contiguous ``(C * K, B)`` buffer, ``F.unfold``'s layout
(as ``nn.Conv2d``'s im2col path uses it). Columns are copied in and added back along the input's
own rows, in long contiguous runs (rows move ``kernel_size[-1]`` elements at a time), and the
structured forms contract them in that layout. A step says which layout it wants
(``ChunkStep.patch_layout``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import ConvGeometry

__all__ = [
    "PATCH_LAYOUTS",
    "Block",
    "ChunkIndex",
    "PatchStream",
    "Stream",
    "FeatureStream",
    "GuideStream",
    "PositionStream",
    "guide_geometry",
    "position_axes",
    "position_frame",
    "blockwise",
    "circular_pad_backward",
    "gather_patch_columns",
    "gather_patches",
    "is_column_major",
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


def circular_pad_backward(grad_pad: Tensor, geom: ConvGeometry) -> Tensor:
    """The gradient of the unpadded input from that of its circular padding, folded in place.

    Each wrapped border is added onto the input elements it copies, one dimension after
    another (as ``F.pad`` pads them); the result is a view of ``grad_pad``: nothing is allocated.
    """
    g = grad_pad
    for d, (left, right) in enumerate(geom.pads):
        axis, n = 2 + d, geom.in_spatial[d]
        inner = g.narrow(axis, left, n)
        if left:
            inner.narrow(axis, n - left, left).add_(g.narrow(axis, 0, left))
        if right:
            inner.narrow(axis, 0, right).add_(g.narrow(axis, left + n, right))
        g = inner
    return g


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
        """The blocks of the locations ``[start, end)`` of ``geom``."""
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


PATCH_LAYOUTS = ("rows", "columns")


def is_column_major(rows: Tensor) -> bool:
    """Whether patch rows ``(B, W)`` are the transpose of a contiguous ``(W, B)`` buffer (``"columns"``)."""
    return rows.dim() == 2 and rows.shape[0] > 1 and rows.stride(0) == 1 and rows.stride(1) == rows.shape[0]


def _column_view(x_pad: Tensor, block: Block, geom: ConvGeometry) -> Tensor:
    """One block of :func:`_patch_view`, dims moved to ``(C, *kernel_size, nb, *block_out)``.

    The ``"columns"`` layout of the block, as ``F.unfold`` would lay it out: its last dims run
    along the input's own rows (contiguous for stride 1), so copying it out is fast. Taps
    overlap in memory: only ever copied out, or added to one tap at a time.
    """
    spans = tuple(slice(*_span(i, n)) for i, n in zip(block, (geom.batch, *geom.out_spatial)))
    d = geom.ndim
    return _patch_view(x_pad, geom)[spans].permute(d + 1, *range(d + 2, 2 * d + 2), *range(d + 1))


def _tap_offsets(x_pad: Tensor, geom: ConvGeometry) -> list[int]:
    """Per kernel tap, in ``F.unfold`` order, how far its element lies from the window's first in ``x_pad``."""
    s_sp = x_pad.stride()[2:]
    taps = itertools.product(*(range(k) for k in geom.kernel_size))
    return [sum(k * dil * s for k, dil, s in zip(tap, geom.dilation, s_sp)) for tap in taps]


def gather_patch_columns(x_pad: Tensor, chunk: ChunkIndex, geom: ConvGeometry) -> Tensor:
    """The chunk's patches in the ``"columns"`` layout: rows ``(B, C * K)`` that are the transpose
    of a contiguous ``(C * K, B)`` buffer, each block copied straight into its columns.
    """
    out = torch.empty(geom.patch_size, chunk.end - chunk.start, dtype=x_pad.dtype, device=x_pad.device)
    pos = 0
    for block in chunk.cells:
        view = _column_view(x_pad, block, geom)
        n = math.prod(view.shape[1 + geom.ndim :])
        out[:, pos : pos + n].view(view.shape).copy_(view)
        pos += n
    return out.t()


def _scatter_columns(grad_pad: Tensor, grad_patches: Tensor, chunk: ChunkIndex, geom: ConvGeometry) -> None:
    """Add patch gradients in the ``"columns"`` layout into ``grad_pad``, one kernel tap per block
    at a time (for a fixed tap, locations map to distinct input elements): long contiguous adds.

    The taps' views of ``grad_pad`` overlap one another, so they are added one after another: on
    the CPU in one ``torch._foreach_add_`` (a loop in C++), elsewhere in a Python loop (CUDA's
    fused foreach kernels would add overlapping views concurrently).
    """
    columns = grad_patches.t()
    offsets = _tap_offsets(grad_pad, geom)
    pos = 0
    for block in chunk.cells:
        view = _column_view(grad_pad, block, geom)
        per_tap = view.shape[1 + geom.ndim :]
        n = math.prod(per_tap)
        part = columns[:, pos : pos + n].reshape(view.shape)  # a view for column-major gradients
        pos += n
        keep = (0, *range(1 + geom.ndim, view.dim()))  # the channel and block dims: one tap's view
        size, stride = [view.shape[d] for d in keep], [view.stride(d) for d in keep]
        targets = [view.as_strided(size, stride, view.storage_offset() + o) for o in offsets]
        sources = part.reshape(geom.in_channels, geom.kernel_numel, *per_tap).unbind(1)
        (torch._foreach_add_ if grad_pad.device.type == "cpu" else _add_each)(targets, sources)


def _add_each(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """``targets[i] += sources[i]``, one after another (the targets may overlap one another)."""
    for target, source in zip(targets, sources):
        target.add_(source)


def scatter_patch_grads(
    grad_pad: Tensor, grad_patches: Tensor, chunk: ChunkIndex, geom: ConvGeometry, layout: str = "rows"
) -> None:
    """Add patch gradients ``(B, C * K)``, the gradients of patch rows read in ``layout``
    (:data:`PATCH_LAYOUTS`), into ``grad_pad`` (padded shape).

    For 2-D with large patches, each block of the chunk is folded (``F.fold``, col2im) into the
    window of the input it covers: a few large ops per chunk. Otherwise one kernel tap at a time:
    for a fixed tap the map from location to input element is injective, so each write is a plain
    accumulate (faster for small kernels, e.g. 3x3 over a few channels, measured on CPU).
    Gradients in the ``"columns"`` layout are added one tap per block along the input's rows on
    the CPU (measured 2-8x faster than folding them, which col2im does on one thread for one
    image), and folded on a GPU in 2-D (one kernel per block instead of one per tap).
    """
    columns = layout == "columns"
    if columns and (geom.ndim != 2 or grad_pad.device.type == "cpu" or grad_patches.dtype not in _FOLD_DTYPES):
        _scatter_columns(grad_pad, grad_patches, chunk, geom)
        return
    large = columns or geom.kernel_numel >= 25 or geom.patch_size >= 256
    if geom.ndim == 2 and large and grad_patches.dtype in _FOLD_DTYPES:
        _scatter_folded(grad_pad, grad_patches, chunk, geom)
        return
    s_n, s_c, *s_sp = grad_pad.stride()
    size = (geom.batch, *geom.out_spatial, geom.in_channels)
    stride = (s_n, *(st * s for st, s in zip(geom.stride, s_sp)), s_c)
    per_tap = grad_patches.view(-1, geom.in_channels, geom.kernel_numel)
    for t, offset in enumerate(_tap_offsets(grad_pad, geom)):
        view = grad_pad.as_strided(size, stride, grad_pad.storage_offset() + offset)
        blockwise(view, chunk.cells, per_tap[:, :, t], "add")


_FOLD_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}


def _span(index: int | slice, size: int) -> tuple[int, int]:
    if isinstance(index, int):
        return index, index + 1
    start, stop, _ = index.indices(size)
    return start, stop


def _scatter_folded(grad_pad: Tensor, grad_patches: Tensor, chunk: ChunkIndex, geom: ConvGeometry) -> None:
    """2-D: each block ``(images, out rows, out columns)`` is a rectangle, so ``F.fold`` adds its
    patch gradients into the input window it reads, overlaps summed.
    """
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    sizes = (geom.batch, *geom.out_spatial)
    pos = 0
    for block in chunk.cells:
        (n0, n1), (h0, h1), (w0, w1) = (_span(i, n) for i, n in zip(block, sizes))
        nb, hb, wb = n1 - n0, h1 - h0, w1 - w0
        rows = grad_patches[pos : pos + nb * hb * wb]
        pos += nb * hb * wb
        height, width = (hb - 1) * sh + dh * (kh - 1) + 1, (wb - 1) * sw + dw * (kw - 1) + 1
        columns = rows.reshape(nb, hb * wb, -1).transpose(1, 2)
        folded = F.fold(columns, (height, width), (kh, kw), dilation=(dh, dw), stride=(sh, sw))
        grad_pad[n0:n1, :, h0 * sh : h0 * sh + height, w0 * sw : w0 * sw + width].add_(folded)


class Stream(Protocol):
    """One per-location input of a step, read chunk by chunk (see the module docstring).

    ``requires_grad``: whether backward wants this stream's gradient.
    """

    requires_grad: bool

    def gather(self, chunk: ChunkIndex) -> Tensor:
        """The chunk's rows ``(B, width)``."""

    def add_grad(self, chunk: ChunkIndex, grad: Tensor) -> None:
        """Receive the gradient of the chunk's rows (backward, when :attr:`requires_grad`)."""

    def grad(self) -> Tensor | None:
        """The gradient of the stream's source, summed over the chunks (``None`` without one)."""


class PatchStream:
    """The input's patches: rows ``(B, C * prod(kernel_size))`` in ``F.unfold`` order.

    ``input_grad`` (backward only): keep a padded gradient buffer, to which each chunk's patch
    gradients are added; :meth:`grad` maps it back through the padding. ``layout``: one of
    :data:`PATCH_LAYOUTS`.
    """

    def __init__(self, x: Tensor, geom: ConvGeometry, *, input_grad: bool = False, layout: str = "rows") -> None:
        assert layout in PATCH_LAYOUTS, layout
        self.geom = geom
        self.columns = layout == "columns"
        self.requires_grad = input_grad
        if input_grad:
            self._leaf = x.detach().requires_grad_()
            self._padded = pad_input(self._leaf, geom)
            self.source = self._padded.detach()
            # in the source's layout: unpadded, the buffer is the gradient handed back, and autograd keeps
            # one in the input's layout as it is (another layout it would copy, a buffer no plan counts)
            self._grad_pad: Tensor | None = torch.zeros_like(self.source, memory_format=torch.preserve_format)
        else:
            self.source = pad_input(x.detach(), geom)
            self._grad_pad = None

    def gather(self, chunk: ChunkIndex) -> Tensor:
        """The chunk's patches, in the stream's layout."""
        if self.columns:
            return gather_patch_columns(self.source, chunk, self.geom)
        return gather_patches(self.source, chunk, self.geom)

    def add_grad(self, chunk: ChunkIndex, grad: Tensor) -> None:
        """Add the chunk's patch gradients into the padded gradient buffer."""
        assert self._grad_pad is not None
        layout = "columns" if self.columns else "rows"
        scatter_patch_grads(self._grad_pad, grad.to(self._grad_pad.dtype), chunk, self.geom, layout)

    def grad(self) -> Tensor | None:
        """The input's gradient, mapped back through the padding."""
        if self._grad_pad is None:
            return None
        if self._padded is self._leaf:
            return self._grad_pad
        if self.geom.padding_mode == "circular":  # F.pad's circular backward allocates ~3x the input
            return circular_pad_backward(self._grad_pad, self.geom)
        return torch.autograd.grad(self._padded, self._leaf, self._grad_pad)[0]


class FeatureStream:
    """Per-location features ``(N, F, *out_spatial)``: rows ``(B, F)``, one per output location.

    Not convolved: the row of a location is that location's column of features. Gradients are
    written row by row into an ``(N, *out_spatial, F)`` buffer.
    """

    def __init__(self, features: Tensor, geom: ConvGeometry, *, input_grad: bool = False) -> None:
        self.requires_grad = input_grad
        self.source = features.detach().movedim(1, -1)  # (N, *out, F), a view
        self.width = features.shape[1]
        # written through the same (N, *out, F) view of an (N, F, *out) buffer in the features' own layout,
        # which autograd keeps as it is (a gradient in another layout it would copy, a buffer no plan counts)
        self._grad = (
            torch.zeros_like(features, memory_format=torch.preserve_format).movedim(1, -1) if input_grad else None
        )

    def gather(self, chunk: ChunkIndex) -> Tensor:
        """The chunk's feature rows ``(B, F)``."""
        out = torch.empty(chunk.end - chunk.start, self.width, dtype=self.source.dtype, device=self.source.device)
        blockwise(self.source, chunk.cells, out, "read")
        return out.view(out.shape)  # a view, for the reason gather_patches gives

    def add_grad(self, chunk: ChunkIndex, grad: Tensor) -> None:
        """Write the chunk's feature gradients (each row once)."""
        assert self._grad is not None
        blockwise(self._grad, chunk.cells, grad.to(self._grad.dtype), "write")  # each row once: write

    def grad(self) -> Tensor | None:
        """The features' gradient ``(N, F, *out)``."""
        return None if self._grad is None else self._grad.movedim(-1, 1)


def guide_geometry(geom: ConvGeometry, channels: int) -> ConvGeometry:
    """``geom`` for a guide of ``channels`` channels: windowed exactly like the input."""
    return replace(geom, in_channels=channels, groups=1)


class GuideStream(PatchStream):
    """A guide ``(N, G, *in_spatial)``, windowed like the input: rows ``(B, G * prod(kernel_size))``."""

    def __init__(self, guide: Tensor, geom: ConvGeometry, *, input_grad: bool = False) -> None:
        super().__init__(guide, guide_geometry(geom, guide.shape[1]), input_grad=input_grad)


# The frame positions are given in (see position_frame): the tile's spatial size, its first
# element's index in the whole input, and the whole input's spatial size.
_FRAME: ContextVar[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None] = ContextVar(
    "chunkconv_position_frame", default=None
)


@contextmanager
def position_frame(shape: Sequence[int], origin: Sequence[int], size: Sequence[int]) -> Iterator[None]:
    """Inside the block, an input of spatial ``shape`` is the tile at ``origin`` of a whole input of ``size``.

    ``inputs=("positions",)`` then gives each location's position in the whole input, not in
    the tile: what :func:`chunkconv.tiled` sets around each layer it calls. It applies to calls
    on an input of exactly ``shape`` (per spatial dimension), in this thread or task only (a
    context variable).
    """
    token = _FRAME.set((tuple(shape), tuple(origin), tuple(size)))
    try:
        yield
    finally:
        _FRAME.reset(token)


def position_axes(geom: ConvGeometry) -> list[Tensor]:
    """Per spatial dimension, each output index's window centre in the input, in [-1, 1].

    As ``grid_sample`` with ``align_corners=False``: -1 and 1 are the outer edges of the input;
    output index ``o`` has its window centre at input pixel ``o * stride - pad_left +
    dilation * (k - 1) / 2``, whose centre lies at ``(2 * pixel + 1) / size - 1``. Inside
    :func:`position_frame`, for an input of its shape, the pixel is offset by the frame's
    origin and ``size`` is the whole input's.
    """
    frame = _FRAME.get()
    if frame is None or frame[0] != geom.in_spatial:
        frame = (geom.in_spatial, (0,) * geom.ndim, geom.in_spatial)
    _, origin, size = frame
    axes = []
    for d in range(geom.ndim):
        o = torch.arange(geom.out_spatial[d], dtype=torch.float64)
        centre = origin[d] + o * geom.stride[d] - geom.pads[d][0] + geom.dilation[d] * (geom.kernel_size[d] - 1) / 2
        axes.append((2 * centre + 1) / size[d] - 1)
    return axes


class PositionStream:
    """Each output location's coordinates: rows ``(B, ndim)`` (see :func:`position_axes`). No source, no gradient."""

    requires_grad = False

    def __init__(self, geom: ConvGeometry, dtype: torch.dtype, device: torch.device) -> None:
        full = (geom.batch, *geom.out_spatial)
        self.axes = []
        for d, axis in enumerate(position_axes(geom)):
            shape = [1] * (geom.ndim + 1)
            shape[d + 1] = -1
            self.axes.append(axis.to(device=device, dtype=dtype).view(shape).expand(full))
        self.dtype, self.device = dtype, device

    def gather(self, chunk: ChunkIndex) -> Tensor:
        """The chunk's position rows ``(B, ndim)``."""
        out = torch.empty(len(self.axes), chunk.end - chunk.start, dtype=self.dtype, device=self.device)
        for d, axis in enumerate(self.axes):
            blockwise(axis, chunk.cells, out[d], "read")
        return out.t().contiguous()

    def add_grad(self, chunk: ChunkIndex, grad: Tensor) -> None:
        """Never called: positions take no gradient."""
        raise AssertionError("positions take no gradient")

    def grad(self) -> Tensor | None:
        """``None``: positions have no source."""
        return None
