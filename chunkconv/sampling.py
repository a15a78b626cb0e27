"""Deformable sampling, streamed: a chunk's sampled patches, their gradients, and the layouts.

:class:`DeformPatchStream` is a :class:`~chunkconv.gather.Stream` whose rows are the chunk's
*sampled* patches, ``(B, C * K)`` in ``F.unfold``'s order (channel slowest, then taps): tap
``t`` of output location ``o`` in offset group ``g`` is read at ``o * stride - pad_left +
tap_t * dilation + offsets[n, g, t, :, o]`` by multilinear interpolation over the ``2 ** d``
surrounding grid points, grid points outside the input counting as zero, and multiplied by the
mask when there is one. Only the chunk's samples are formed (never the whole im2col buffer);
backward adds each chunk's gradients into the input (``index_add_``: deterministic on the CPU;
on CUDA it adds with atomics, so the input's gradient may differ in its last bits between runs,
unless ``torch.use_deterministic_algorithms(True)``, under which torch's ``index_add_`` is
deterministic), the offsets and the mask (each location's, written by its own chunk). The
semantics and the two gradient rules are those of :mod:`chunkconv.deform_reference`, the
float64 oracle the stream is tested against.

The canonical offset layout, which the engine and the ops share: ``(N, G, K, d, *out)`` in
pixel units, ``K = prod(kernel_size)`` taps in ``F.unfold``'s row-major order, coordinates
slowest spatial dimension first (2-D: ``(dy, dx)``, torchvision's layout); the mask
``(N, G, K, *out)``. Offset group ``g`` covers input channels ``[g * C / G, (g + 1) * C / G)``,
independently of the convolution's groups. :func:`torchvision_offsets`,
:func:`dcnv3_offsets` and :func:`dcnv4_offsets` turn the ops' argument layouts into it, with
plain (differentiable) tensor ops.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .deform_reference import check_rule
from .gather import PATCH_LAYOUTS, ChunkIndex, blockwise
from .geometry import ConvGeometry

__all__ = [
    "DeformPatchStream",
    "check_offsets",
    "dcnv3_offsets",
    "dcnv4_offsets",
    "deform_fixed_costs",
    "opmath_dtype",
    "torchvision_offsets",
]


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype positions, interpolation weights and accumulations are computed in.

    float16 and bfloat16 compute in float32 (as torch's own ``opmath`` and the DCN CUDA kernels
    do): a position such as ``200.3`` is not representable in bfloat16 (its spacing is 1 there),
    and per-tap sums of small gradients lose their low bits in a half accumulator. Other
    floating dtypes compute in themselves.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_offsets(offsets: Tensor, mask: Tensor | None, geom: ConvGeometry) -> int:
    """Check canonical offsets ``(N, G, K, d, *out)`` and a mask ``(N, G, K, *out)`` against ``geom``.

    Returns:
        ``G``, the number of offset groups.

    Raises:
        ValueError: a shape that does not fit, a ``G`` that does not divide the input channels,
            or a padding mode other than zeros.
        TypeError: offsets or mask not floating point.

    """
    d, k, n, out = geom.ndim, geom.kernel_numel, geom.batch, geom.out_spatial
    if geom.padding_mode != "zeros":
        raise ValueError(
            f"Deformable sampling pads with zeros only; expected padding_mode='zeros', "
            f"got padding_mode={geom.padding_mode!r}."
        )
    if not offsets.is_floating_point():
        raise TypeError(f"Expected floating-point offsets, got dtype {offsets.dtype}.")
    if offsets.dim() != 4 + d or offsets.shape[0] != n or tuple(offsets.shape[2:]) != (k, d, *out):
        raise ValueError(f"Expected offsets of shape (N={n}, G, K={k}, d={d}, *out={out}), got {tuple(offsets.shape)}.")
    g = offsets.shape[1]
    if g < 1 or geom.in_channels % g:
        raise ValueError(f"Expected a number of offset groups that divides in_channels={geom.in_channels}, got G={g}.")
    if mask is not None:
        if not mask.is_floating_point():
            raise TypeError(f"Expected a floating-point mask, got dtype {mask.dtype}.")
        if tuple(mask.shape) != (n, g, k, *out):
            raise ValueError(f"Expected a mask of shape {(n, g, k, *out)}, got {tuple(mask.shape)}.")
    return g


def deform_fixed_costs(
    geom: ConvGeometry,
    groups: int,
    dtype: torch.dtype,
    *,
    input_grad: bool = False,
    offset_grad: bool = False,
    mask_grad: bool = False,
) -> tuple[dict[str, int], dict[str, int]]:
    """The chunk-independent allocations of a :class:`DeformPatchStream`, forward and backward, by name.

    Pure arithmetic, no tensors, in the planner's form (see :func:`chunkconv.planner.fixed_costs`):
    the channels-last copy of the input the stream samples from (both phases), and in backward
    the gradient buffers it accumulates into, in :func:`opmath_dtype` (the input gradient
    :meth:`DeformPatchStream.grads` returns takes the input copy's place once every chunk is done).
    What one chunk allocates on top is measured, as for every step.

    Args:
        geom: the convolution's geometry.
        groups: the number of offset groups ``G``.
        dtype: the input's dtype.
        input_grad: whether backward accumulates the input's gradient.
        offset_grad: whether backward accumulates the offsets' gradient.
        mask_grad: whether backward accumulates the mask's gradient.

    Returns:
        ``(forward, backward)``, bytes by name.

    """
    item, op_item = dtype.itemsize, opmath_dtype(dtype).itemsize
    n, c, k, d = geom.batch, geom.in_channels, geom.kernel_numel, geom.ndim
    image = n * c * math.prod(geom.in_spatial)
    source = (image + c // groups) * item  # plus the zero row
    per_tap = geom.num_patches * groups * k
    forward = {"input, channels-last rows": source}
    backward = {
        "input, channels-last rows": source,
        "input gradient rows": (image + c // groups) * op_item if input_grad else 0,
        # the input's gradient, image * item bytes, is made after every chunk, once the sampler's
        # copy of the input (as large, plus a row) is freed (DeformPatchStream.grads): no entry
        "offsets gradient": per_tap * d * op_item if offset_grad else 0,
        "mask gradient": per_tap * op_item if mask_grad else 0,
    }
    if item < op_item and (offset_grad or mask_grad):
        # the gradients' copies in their sources' dtype, made one after the other at the end of
        # backward: the mask's fits where the offsets' accumulator was, the offsets' does not
        backward["gradient copies in the input's dtype"] = per_tap * (d if offset_grad else 1) * item
    return forward, backward


class DeformPatchStream:
    """The input's sampled patches: rows ``(B, C * K)`` in ``F.unfold`` order (see the module docstring).

    Args:
        x: the input ``(N, C, *in_spatial)`` (unpadded: the padding is in the positions, and
            only zero padding exists for sampling).
        offsets: canonical ``(N, G, K, d, *out)``, pixel units.
        mask: ``(N, G, K, *out)`` or None. The mask is part of the stream, not of the kernel
            form: it scales the samples of one offset group and tap, which no kernel form
            expresses under conv groups that differ from the offset groups, and its gradient
            (the sample, summed over the group's channels) comes from the corner values the
            offsets' gradient reads anyway.
        geom: the convolution's geometry (``pads[a][0]`` is the left padding of axis ``a``).
        rule: the gradient rule, ``"torchvision"`` or ``"strict"`` (DCNv3/DCNv4); see
            :mod:`chunkconv.deform_reference`. Default: ``"torchvision"``.
        input_grad: whether backward accumulates the input's gradient.
        offset_grad: whether backward accumulates the offsets' gradient.
        mask_grad: whether backward accumulates the mask's gradient.
        layout: one of :data:`~chunkconv.gather.PATCH_LAYOUTS`, as for
            :class:`~chunkconv.gather.PatchStream`: ``"rows"`` (a contiguous ``(B, C * K)``) or
            ``"columns"`` (the transpose of a contiguous ``(C * K, B)``). Default: ``"rows"``.

    Dtypes: the rows come in ``x``'s dtype; positions, interpolation weights and the sums over
    the corners are computed in :func:`opmath_dtype` (float32 for float16/bfloat16) and
    rounded once; the gradients are accumulated in that dtype and returned in their sources'.

    :meth:`grad` returns the input's gradient (the :class:`~chunkconv.gather.Stream`
    protocol); :meth:`grads` returns all three.

    """

    def __init__(
        self,
        x: Tensor,
        offsets: Tensor,
        mask: Tensor | None,
        geom: ConvGeometry,
        *,
        rule: str = "torchvision",
        input_grad: bool = False,
        offset_grad: bool = False,
        mask_grad: bool = False,
        layout: str = "rows",
    ) -> None:
        if layout not in PATCH_LAYOUTS:
            raise ValueError(f"Invalid value for `layout`; expected one of {PATCH_LAYOUTS}, got layout={layout!r}.")
        self.columns = layout == "columns"
        self.rule = check_rule(rule)
        self.groups = check_offsets(offsets, mask, geom)
        if mask_grad and mask is None:
            raise ValueError("mask_grad=True needs a mask, got mask=None.")
        self.geom = geom
        self.requires_grad = input_grad or offset_grad or mask_grad
        self.input_grad, self.offset_grad, self.mask_grad = input_grad, offset_grad, mask_grad
        self.dtype = x.dtype
        self.opmath = opmath_dtype(x.dtype)
        n, c, *spatial = x.shape
        g, d = self.groups, geom.ndim
        self.cg = c // g
        self.size = math.prod(spatial)
        # Channels-last rows ``(N * S * G + 1, C // G)``: one row per image, pixel and group,
        # plus a zero row that every out-of-range grid point reads (no masking of values).
        self.source = x.new_zeros(n * self.size * g + 1, self.cg)
        self.source[:-1].view(n, self.size, g, self.cg).copy_(
            x.detach().reshape(n, g, self.cg, self.size).permute(0, 3, 1, 2)
        )
        self.zero_row = n * self.size * g
        self.offsets = offsets.detach().permute(0, *range(4, 4 + d), 1, 2, 3)  # (N, *out, G, K, d)
        self.mask = None if mask is None else mask.detach().permute(0, *range(3, 3 + d), 1, 2)  # (N, *out, G, K)
        dev = x.device
        self.strides = [math.prod(spatial[a + 1 :]) for a in range(d)]
        self.spatial = spatial
        taps = torch.tensor(list(itertools.product(*(range(k) for k in geom.kernel_size))), device=dev)
        self.taps = (taps * torch.tensor(geom.dilation, device=dev)).to(self.opmath)  # (K, d)
        self._grad_src = torch.zeros(self.source.shape, dtype=self.opmath, device=dev) if input_grad else None
        # The gradients handed back are in their sources' own layouts, which autograd keeps as they
        # are (a gradient in another layout it copies into `.grad`: a buffer no plan counts); the
        # offsets' and the mask's are accumulated in place through the same (N, *out, ...) views.
        self._like = x.detach()
        self._grad_off = (
            torch.zeros_like(offsets, dtype=self.opmath, memory_format=torch.preserve_format).permute(
                0, *range(4, 4 + d), 1, 2, 3
            )
            if offset_grad
            else None
        )
        self._grad_mask = (
            torch.zeros_like(mask, dtype=self.opmath, memory_format=torch.preserve_format).permute(
                0, *range(3, 3 + d), 1, 2
            )
            if mask_grad and mask is not None
            else None
        )
        self._mask_dtype = None if mask is None else mask.dtype
        self._off_dtype = offsets.dtype

    # -- where a chunk samples --------------------------------------------------------------

    def _rows(self, view: Tensor, chunk: ChunkIndex) -> Tensor:
        """The chunk's rows of a per-location view ``(N, *out, ...)`` as ``(B, ...)``, in opmath."""
        item = view.shape[1 + self.geom.ndim :]
        out = torch.empty(chunk.end - chunk.start, *item, dtype=view.dtype, device=view.device)
        blockwise(view, chunk.cells, out, "read")
        return out.to(self.opmath)

    def _positions(self, chunk: ChunkIndex) -> tuple[Tensor, Tensor]:
        """``(B, G, K, d)`` sampling positions of the chunk, and each row's image index ``(B,)``."""
        geom = self.geom
        flat = torch.arange(chunk.start, chunk.end, device=self.source.device)
        image, rest = flat // geom.locations_per_image, flat % geom.locations_per_image
        starts = []
        for a in reversed(range(geom.ndim)):
            o = rest % geom.out_spatial[a]
            rest = rest // geom.out_spatial[a]
            starts.append(o * geom.stride[a] - geom.pads[a][0])
        start = torch.stack(starts[::-1], dim=-1).to(self.opmath)  # (B, d)
        pos = start[:, None, None, :] + self.taps[None, None, :, :] + self._rows(self.offsets, chunk)
        return pos, image

    def _corners(self, pos: Tensor, image: Tensor) -> Iterator[tuple[Tensor, Tensor, list[Tensor]]]:
        """Per corner of the ``2 ** d`` around each position: its source row ``(B, G, K)``, its
        weight ``(B, G, K)`` and, per axis, the weight's derivative along that axis.
        """
        d, g = self.geom.ndim, self.groups
        # Clamped first, so that offsets of any size (inf included) index nothing out of range
        # and give finite weights: below -1 or from `size` on, every grid point around is
        # outside anyway. A NaN stays NaN: it converts to some integer, fails the range test and
        # reads the zero row, with a NaN weight (a NaN sample, as the oracle gives).
        pos = torch.stack([pos[..., a].clamp(-2, self.spatial[a]) for a in range(d)], dim=-1)
        low = pos.floor()
        frac = pos - low
        low_i = low.to(torch.long)
        base = (image * self.size)[:, None, None] * g
        group = torch.arange(g, device=pos.device)[None, :, None]
        for corner in itertools.product((0, 1), repeat=d):
            ws = [frac[..., a] if hi else 1 - frac[..., a] for a, hi in enumerate(corner)]
            valid = torch.ones(low_i.shape[:-1], dtype=torch.bool, device=pos.device)
            pixel = torch.zeros(low_i.shape[:-1], dtype=torch.long, device=pos.device)
            for a, hi in enumerate(corner):
                i = low_i[..., a] + hi
                valid &= (i >= 0) & (i < self.spatial[a])
                pixel += i * self.strides[a]
            row = torch.where(valid, base + pixel * g + group, self.zero_row)
            weight = math.prod(ws[1:], start=ws[0])
            dweights = []
            for a, hi in enumerate(corner):
                others = [w for b, w in enumerate(ws) if b != a]
                dw = math.prod(others[1:], start=others[0]) if others else torch.ones_like(ws[0])
                dweights.append(dw if hi else -dw)
            yield row, weight, dweights

    def _values(self, row: Tensor) -> Tensor:
        """The source rows ``row`` ``(B, G, K)`` as ``(B, G, K, C // G)``, in opmath."""
        return self.source.index_select(0, row.reshape(-1)).view(*row.shape, self.cg).to(self.opmath)

    # -- the Stream protocol -----------------------------------------------------------------

    def gather(self, chunk: ChunkIndex) -> Tensor:
        """The chunk's sampled patch rows ``(B, C * K)`` (transposed columns in the columns layout)."""
        pos, image = self._positions(chunk)
        acc = torch.zeros(*pos.shape[:-1], self.cg, dtype=self.opmath, device=pos.device)
        for row, weight, _ in self._corners(pos, image):
            acc.addcmul_(self._values(row), weight[..., None])
        if self.mask is not None:
            acc.mul_(self._rows(self.mask, chunk)[..., None])
        b = chunk.end - chunk.start
        if self.columns:  # (G, Cg, K, B) -> a contiguous (C * K, B), returned transposed
            return acc.permute(1, 3, 2, 0).reshape(-1, b).to(self.dtype).t()
        out = acc.permute(0, 1, 3, 2).reshape(b, -1).to(self.dtype)  # (B, G, Cg, K) -> (B, C * K)
        return out.view(out.shape)  # a view, for the reason gather_patches gives

    def add_grad(self, chunk: ChunkIndex, grad: Tensor) -> None:
        """Add the gradient of the chunk's rows into the input's, the offsets' and the mask's (those asked for)."""
        pos, image = self._positions(chunk)
        b, g, k, _ = pos.shape
        # (B, G, K, Cg), contiguous: every product below then runs over contiguous memory
        up = grad.reshape(b, g, self.cg, k).transpose(2, 3).to(self.opmath, memory_format=torch.contiguous_format)
        mask = None if self.mask is None else self._rows(self.mask, chunk)
        up_masked = up if mask is None else up * mask[..., None]
        want_values = self._grad_off is not None or self._grad_mask is not None
        grad_pos = torch.zeros_like(pos) if self._grad_off is not None else None
        grad_mask = torch.zeros_like(pos[..., 0]) if self._grad_mask is not None else None
        for row, weight, dweights in self._corners(pos, image):
            if self._grad_src is not None:
                self._grad_src.index_add_(0, row.reshape(-1), (up_masked * weight[..., None]).reshape(-1, self.cg))
            if want_values:
                dot = (up * self._values(row)).sum(-1)  # (B, G, K): upstream . corner value
                if grad_mask is not None:
                    grad_mask.addcmul_(dot, weight)
                if grad_pos is not None:
                    dot_m = dot if mask is None else dot * mask
                    for a, dw in enumerate(dweights):
                        grad_pos[..., a].addcmul_(dot_m, dw)
        if grad_pos is not None:
            if self.rule == "strict":
                inside = torch.ones(pos.shape[:-1], dtype=torch.bool, device=pos.device)
                for a in range(self.geom.ndim):
                    inside &= (pos[..., a] > -1) & (pos[..., a] < self.spatial[a])
                grad_pos.mul_(inside[..., None])
            assert self._grad_off is not None
            blockwise(self._grad_off, chunk.cells, grad_pos, "add")
        if grad_mask is not None:
            assert self._grad_mask is not None
            blockwise(self._grad_mask, chunk.cells, grad_mask, "add")

    def grad(self) -> Tensor | None:
        """The input's gradient ``(N, C, *in_spatial)`` in its dtype (None unless ``input_grad``)."""
        if self._grad_src is None:
            return None
        n = self.geom.batch
        rows = self._grad_src[:-1].view(n, self.size, self.groups, self.cg)
        grad = torch.empty_like(self._like, memory_format=torch.preserve_format)  # the input's layout (see above)
        return grad.copy_(rows.permute(0, 2, 3, 1).reshape(grad.shape))

    def grads(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The gradients of the input, the canonical offsets and the mask, in their dtypes (None
        where not asked for).
        """
        d = self.geom.ndim
        del self.source  # every chunk is done: the input's gradient takes the place of its copy
        grad = self.grad()
        self._grad_src = None  # each accumulator goes once its gradient is out: the copies below
        off = None  # (float16/bfloat16 sources) then reuse its memory, as the plan counts them
        if self._grad_off is not None:
            off = self._grad_off.permute(0, d + 1, d + 2, d + 3, *range(1, d + 1)).to(self._off_dtype)
            self._grad_off = None
        mask = None
        if self._grad_mask is not None:
            mask = self._grad_mask.permute(0, d + 1, d + 2, *range(1, d + 1)).to(self._mask_dtype)
            self._grad_mask = None
        return grad, off, mask


# -- layouts ---------------------------------------------------------------------------------


def torchvision_offsets(
    offset: Tensor, mask: Tensor | None, kernel_size: Sequence[int]
) -> tuple[Tensor, Tensor | None]:
    """Torchvision-layout ``offset`` ``(N, G * K * d, *out)`` and ``mask`` ``(N, G * K, *out)`` as the
    canonical ``(N, G, K, d, *out)`` and ``(N, G, K, *out)``: views (of contiguous tensors), since torchvision's memory
    layout is the canonical one (``(dy, dx)`` per tap, taps row-major).

    Raises:
        ValueError: channel counts that are not multiples of ``K * d`` (offset) or do not match
            (mask).

    """
    d, k = len(kernel_size), math.prod(kernel_size)
    n, ch, *out = offset.shape
    if len(out) != d or ch % (k * d) or ch == 0:
        raise ValueError(
            f"Expected offset (N, G * K * d, *out) with K * d = {k * d} and {d} spatial dims, "
            f"got {tuple(offset.shape)}."
        )
    g = ch // (k * d)
    if mask is not None and tuple(mask.shape) != (n, g * k, *out):
        raise ValueError(f"Expected a mask of shape {(n, g * k, *out)}, got {tuple(mask.shape)}.")
    return offset.reshape(n, g, k, d, *out), None if mask is None else mask.reshape(n, g, k, *out)


def _dcn_taps(kernel_h: int, kernel_w: int, remove_center: bool) -> list[int]:
    """For each canonical (row-major) tap, its index in DCN's x-major tap list (the centre, when
    removed, maps to ``K'``, one past the end: a zero pad).
    """
    order = [(j, i) for i in range(kernel_w) for j in range(kernel_h)]
    if remove_center:
        order.remove((kernel_h // 2, kernel_w // 2))
    where = {tap: t for t, tap in enumerate(order)}
    return [where.get((j, i), len(order)) for j in range(kernel_h) for i in range(kernel_w)]


def dcnv3_offsets(
    offset: Tensor,
    mask: Tensor,
    *,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool = False,
) -> tuple[Tensor, Tensor]:
    """DCNv3's ``offset`` ``(N, Ho, Wo, G * K' * 2)`` (``(x, y)`` per tap, taps x-major, scaled by
    ``offset_scale`` around the window's centre) and ``mask`` ``(N, Ho, Wo, G * K')`` as the
    canonical offsets ``(N, G, kh * kw, 2, Ho, Wo)`` and mask ``(N, G, kh * kw, Ho, Wo)``.

    DCNv3 samples tap ``(j, i)`` at ``y = ho * sh - ph + a_h + (j * dh - a_h + off_y) * scale``,
    ``a_h = dh * (kh - 1) // 2``; the canonical position is ``ho * sh - ph + j * dh + o_y``, so
    ``o_y = off_y * scale + (j * dh - a_h) * (scale - 1)``, likewise ``x``. A removed centre
    becomes a tap with zero offset and zero mask. Offsets in float16/bfloat16 come back in
    float32 (:func:`opmath_dtype`), as DCNv3's kernel computes its positions.

    Raises:
        ValueError: shapes that do not fit, or ``remove_center`` with an even kernel.

    """
    (kh, kw), (dh, dw) = kernel_size, dilation
    if remove_center and (kh % 2 == 0 or kw % 2 == 0):
        raise ValueError(f"remove_center needs an odd kernel; got kernel_size={kernel_size}.")
    kk = kh * kw - int(remove_center)
    if offset.dim() != 4 or offset.shape[-1] != group * kk * 2:
        raise ValueError(f"Expected offset (N, Ho, Wo, G * K' * 2 = {group * kk * 2}), got {tuple(offset.shape)}.")
    lead = tuple(offset.shape[:3])
    if tuple(mask.shape) != (*lead, group * kk):
        raise ValueError(f"Expected a mask of shape {(*lead, group * kk)}, got {tuple(mask.shape)}.")
    n, ho, wo = lead
    dt = opmath_dtype(offset.dtype)
    index = torch.tensor(_dcn_taps(kh, kw, remove_center), device=offset.device)
    off = offset.to(dt).reshape(n, ho, wo, group, kk, 2).flip(-1)  # (y, x)
    msk = mask.reshape(n, ho, wo, group, kk)
    if remove_center:
        off = torch.cat([off, off.new_zeros(n, ho, wo, group, 1, 2)], dim=4)
        msk = torch.cat([msk, msk.new_zeros(n, ho, wo, group, 1)], dim=4)
    off, msk = off.index_select(4, index), msk.index_select(4, index)  # canonical taps
    taps = torch.tensor(list(itertools.product(range(kh), range(kw))), dtype=dt, device=offset.device)
    centred = taps * torch.tensor([dh, dw], dtype=dt, device=offset.device) - torch.tensor(
        [dh * (kh - 1) // 2, dw * (kw - 1) // 2], dtype=dt, device=offset.device
    )
    canon = off * offset_scale + centred * (offset_scale - 1)  # the centre of an odd kernel: 0
    return canon.permute(0, 3, 4, 5, 1, 2), msk.permute(0, 3, 4, 1, 2)


def dcnv4_offsets(
    offset_mask: Tensor,
    *,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool = False,
) -> tuple[Tensor, Tensor]:
    """DCNv4's packed ``offset_mask`` ``(N, Ho, Wo, ceil(G * 3K' / 8) * 8)`` (per group ``2K'``
    offsets, ``(x, y)`` per tap, then ``K'`` mask values; the padding ignored) as the canonical
    offsets and mask (see :func:`dcnv3_offsets`).

    Raises:
        ValueError: a last dimension other than ``G * 3K'`` padded to a multiple of 8.

    """
    kh, kw = kernel_size
    kk = kh * kw - int(remove_center)
    packed = group * kk * 3
    width = -(-packed // 8) * 8
    if offset_mask.dim() != 4 or offset_mask.shape[-1] != width:
        raise ValueError(
            f"Expected offset_mask (N, Ho, Wo, {width}) (G * 3K' = {packed} padded to a multiple of 8), "
            f"got {tuple(offset_mask.shape)}."
        )
    lead = offset_mask.shape[:3]
    per_group = offset_mask[..., :packed].reshape(*lead, group, 3 * kk)
    return dcnv3_offsets(
        per_group[..., : 2 * kk].reshape(*lead, group * kk * 2),
        per_group[..., 2 * kk :].reshape(*lead, group * kk),
        kernel_size=kernel_size,
        dilation=dilation,
        group=group,
        offset_scale=offset_scale,
        remove_center=remove_center,
    )
