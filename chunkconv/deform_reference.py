"""The float64 oracle for deformable sampling, and reference semantics of the deformable ops.

Everything here is a direct formula over the whole input (no chunking, no ``grid_sample``),
differentiated by plain autograd; tests compare the streamed sampler
(:mod:`chunkconv.sampling`) and the ops built on it with these functions. Pass float64 tensors
for an oracle: the functions compute in the dtype they are given.

Sampling (:func:`sample_reference`): a value at a real position ``p`` (pixel units, integer =
pixel centre, coordinates slowest spatial dimension first) is the multilinear interpolation
(linear in 1-D, bilinear, trilinear) of the ``2 ** d`` grid points around it,
``lo = floor(p)`` and ``lo + 1`` per axis, with weights ``1 - (p - lo)`` and ``p - lo``; a grid
point outside the input counts as zero, so a sample is zero unless ``-1 < p < size`` on every
axis. Gradient rules (:data:`GRADIENT_RULES`), which differ only for the gradient with respect
to the position:

- ``"torchvision"``: the derivative of that formula, so one-sided from the right at integer
  positions (``v[k + 1] - v[k]``), and at exactly ``-1`` on an axis the value is zero but the
  derivative along that axis is ``v[0]`` (torchvision applies no validity test to it).
- ``"strict"`` (DCNv3, DCNv4): the same, times zero wherever the sample is invalid (not
  ``-1 < p < size`` on every axis), so exactly ``-1`` gives a zero gradient too.

The gradients with respect to the input and the mask are the same under both rules.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .geometry import check_ntuple, output_size

__all__ = [
    "GRADIENT_RULES",
    "check_rule",
    "dcnv3_core_reference",
    "dcnv4_core_reference",
    "deform_conv_reference",
    "deform_sample_reference",
    "sample_reference",
]

GRADIENT_RULES = ("torchvision", "strict")


def check_rule(rule: str) -> str:
    """``rule`` checked against :data:`GRADIENT_RULES`.

    Raises:
        ValueError: ``rule`` is not one of :data:`GRADIENT_RULES`.

    """
    if rule not in GRADIENT_RULES:
        raise ValueError(f"Invalid value for `rule`; expected one of {GRADIENT_RULES}, got rule={rule!r}.")
    return rule


def sample_reference(input: Tensor, positions: Tensor, rule: str = "torchvision") -> Tensor:
    """Multilinear samples of ``input`` at absolute ``positions``, one position set per channel group.

    Args:
        input: ``(N, C, *spatial)``, ``d = len(spatial)`` in 1..3.
        positions: ``(N, G, M, d)``: ``M`` positions per image and group, in pixel units of the
            unpadded input, coordinates slowest spatial dimension first. Group ``g`` samples
            channels ``[g * C / G, (g + 1) * C / G)``.
        rule: the gradient rule, one of :data:`GRADIENT_RULES` (see the module docstring).
            Default: ``"torchvision"``.

    Returns:
        ``(N, G, C // G, M)``: the samples, zero wherever a position is not ``-1 < p < size``
        on every axis.

    Raises:
        ValueError: shapes that do not fit together, or an unknown ``rule``.

    """
    check_rule(rule)
    n, c, *spatial = input.shape
    d = len(spatial)
    if positions.dim() != 4 or positions.shape[0] != n or positions.shape[3] != d:
        raise ValueError(f"Expected positions of shape (N={n}, G, M, d={d}), got {tuple(positions.shape)}.")
    g, m = positions.shape[1], positions.shape[2]
    if g < 1 or c % g:
        raise ValueError(f"Expected a number of groups that divides the {c} channels, got G={g}.")
    flat = input.reshape(n, g, c // g, math.prod(spatial))
    lows = [positions[..., a].detach().floor() for a in range(d)]
    fracs = [positions[..., a] - lows[a] for a in range(d)]  # differentiable: d frac / d p = 1
    strides = [math.prod(spatial[a + 1 :]) for a in range(d)]
    out = positions.new_zeros(n, g, c // g, m, dtype=input.dtype)
    for corner in itertools.product((0, 1), repeat=d):
        weight = torch.ones_like(fracs[0])
        index = torch.zeros(n, g, m, dtype=torch.long, device=input.device)
        valid = torch.ones(n, g, m, dtype=torch.bool, device=input.device)
        for a, (hi, low, frac) in enumerate(zip(corner, lows, fracs)):
            weight = weight * (frac if hi else 1 - frac)
            i = low + hi
            valid &= (i >= 0) & (i < spatial[a])
            index += torch.where(valid, i, 0).long() * strides[a]
        index = torch.where(valid, index, 0)
        values = flat.gather(3, index[:, :, None, :].expand(n, g, c // g, m))
        out = out + torch.where(valid[:, :, None, :], values, 0) * weight[:, :, None, :]
    if rule == "strict":
        inside = torch.ones(n, g, m, dtype=torch.bool, device=input.device)
        for a in range(d):
            p = positions[..., a].detach()
            inside &= (p > -1) & (p < spatial[a])
        out = out * inside[:, :, None, :]
    return out


def _tap_grid(kernel_size: Sequence[int], dilation: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(K, d)``: every tap's offset from the window's first element, taps in ``F.unfold`` order."""
    taps = list(itertools.product(*(range(k) for k in kernel_size)))
    return torch.tensor(taps, dtype=dtype, device=device) * torch.tensor(dilation, dtype=dtype, device=device)


def _out_grid(
    out: Sequence[int], stride: Sequence[int], padding: Sequence[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``(L, d)``: every output location's window start ``o * stride - padding``, row-major."""
    axes = [torch.arange(o, dtype=dtype, device=device) * s - p for o, s, p in zip(out, stride, padding)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(out))


def deform_sample_reference(
    input: Tensor,
    offsets: Tensor,
    mask: Tensor | None = None,
    *,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    rule: str = "torchvision",
) -> Tensor:
    """Every sampled (and masked) patch: the columns torchvision and mmcv materialise.

    Tap ``t`` of output location ``o`` in offset group ``g`` is sampled at
    ``o * stride - padding + tap_t * dilation + offsets[n, g, t, :, o]`` (per axis) by
    :func:`sample_reference`, and multiplied by ``mask[n, g, t, o]`` when a mask is given.

    Args:
        input: ``(N, C, *spatial)``, 1-3 spatial dims.
        offsets: the canonical layout ``(N, G, K, d, *out)``, pixel units: ``K = prod(kernel_size)``
            taps in ``F.unfold``'s row-major order, coordinates slowest spatial dim first (2-D:
            ``(dy, dx)``). Offset group ``g`` covers input channels ``[g * C / G, (g + 1) * C / G)``.
        mask: ``(N, G, K, *out)`` or None.
        kernel_size: an int or one per spatial dim.
        stride: an int or one per spatial dim.
        padding: an int or one per spatial dim (symmetric, zeros only).
        dilation: an int or one per spatial dim.
        rule: the gradient rule (:data:`GRADIENT_RULES`). Default: ``"torchvision"``.

    Returns:
        ``(N, C * K, *out)``, channel slowest then taps (``F.unfold``'s order); with zero
        offsets and no mask, ``F.unfold``'s patches.

    Raises:
        ValueError: shapes that do not fit together.

    """
    n, c, *spatial = input.shape
    d = len(spatial)
    ks = check_ntuple(kernel_size, d, "kernel_size")
    st, dil = check_ntuple(stride, d, "stride"), check_ntuple(dilation, d, "dilation")
    pad = check_ntuple(padding, d, "padding", minimum=0)
    out = tuple(output_size(s, k, t, 2 * p, dl) for s, k, t, p, dl in zip(spatial, ks, st, pad, dil))
    k = math.prod(ks)
    if offsets.dim() != 4 + d or offsets.shape[0] != n or tuple(offsets.shape[2:]) != (k, d, *out):
        raise ValueError(f"Expected offsets of shape (N={n}, G, K={k}, d={d}, *out={out}), got {tuple(offsets.shape)}.")
    g = offsets.shape[1]
    if mask is not None and tuple(mask.shape) != (n, g, k, *out):
        raise ValueError(f"Expected a mask of shape {(n, g, k, *out)}, got {tuple(mask.shape)}.")
    base = (
        _out_grid(out, st, pad, offsets.dtype, offsets.device)[None, :, :]
        + _tap_grid(ks, dil, offsets.dtype, offsets.device)[:, None, :]
    )  # (K, L, d)
    m = math.prod(out)  # L, spelled out: no -1, so that an empty batch reshapes too
    positions = base + offsets.reshape(n, g, k, d, m).transpose(3, 4)  # (N, G, K, L, d)
    values = sample_reference(input, positions.reshape(n, g, k * m, d), rule).reshape(n, g, c // g, k, m)
    if mask is not None:
        values = values * mask.reshape(n, g, 1, k, m)
    return values.reshape(n, c * k, *out)


def deform_conv_reference(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    mask: Tensor | None = None,
    *,
    rule: str = "torchvision",
) -> Tensor:
    """The semantics of torchvision's ``deform_conv2d``, generalised to 1-3 spatial dims, as a direct formula.

    ``out[n, o] = bias[o] + sum_{c, t} weight[o, c, t] * col[n, (g_c * Cg + c) * K + t]`` over
    the channels ``c`` of ``o``'s conv group, where ``col`` is :func:`deform_sample_reference`
    of the offsets read as ``(N, G, K, d, *out)`` and the mask as ``(N, G, K, *out)``: exactly
    torchvision's memory layout (``(dy, dx)`` per tap in 2-D, taps row-major), so the
    canonical offsets are a view of ``offset``.

    Args:
        input: ``(N, C, *spatial)``.
        offset: ``(N, G * K * d, *out)``.
        weight: ``(O, C // groups, *kernel_size)``; ``groups = C // weight.shape[1]``.
        bias: ``(O,)`` or None.
        stride: an int or one per spatial dim.
        padding: an int or one per spatial dim (symmetric, zeros).
        dilation: an int or one per spatial dim.
        mask: ``(N, G * K, *out)`` or None (DCNv1 when None, DCNv2 otherwise).
        rule: the gradient rule (:data:`GRADIENT_RULES`). Default: ``"torchvision"``.

    Returns:
        ``(N, O, *out)``.

    Raises:
        ValueError: shapes that do not fit together.

    """
    n, c, *spatial = input.shape
    d = len(spatial)
    ks = tuple(weight.shape[2:])
    k = math.prod(ks)
    if weight.dim() != d + 2 or c % weight.shape[1] or weight.shape[0] % (c // weight.shape[1]):
        raise ValueError(
            f"Expected a weight (O, C // groups, *kernel_size) for an input with {c} channels and {d} spatial "
            f"dims, got {tuple(weight.shape)}."
        )
    groups = c // weight.shape[1]
    if offset.shape[1] % (k * d):
        raise ValueError(f"Expected offset channels a multiple of K * d = {k * d}, got {offset.shape[1]}.")
    g = offset.shape[1] // (k * d)
    out = tuple(offset.shape[2:])
    cols = deform_sample_reference(
        input,
        offset.reshape(n, g, k, d, *out),
        None if mask is None else mask.reshape(n, g, k, *out),
        kernel_size=ks,
        stride=stride,
        padding=padding,
        dilation=dilation,
        rule=rule,
    )
    o = weight.shape[0]
    cols = cols.reshape(n, groups, (c // groups) * k, math.prod(out))
    y = torch.einsum("ngpl,gop->ngol", cols, weight.reshape(groups, o // groups, -1)).reshape(n, o, *out)
    if bias is not None:
        y = y + bias.reshape(1, o, *([1] * d))
    return y


def _dcn_positions(
    n: int,
    out: tuple[int, int],
    offset: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> Tensor:
    """DCNv3/DCNv4's sampling positions ``(N, G, Ho * Wo * K', 2)`` as ``(y, x)``, straight from
    their CUDA kernels: taps x-major (``i`` over the width outer, ``j`` over the height inner),
    the centre skipped when ``remove_center``, ``x = wo * sw - pw + a_w + ((i * dw - a_w) +
    off_x) * offset_scale`` with ``a_w = dw * (kw - 1) // 2``, likewise ``y``.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dilation
    taps = [(j, i) for i in range(kw) for j in range(kh) if not (remove_center and i == kw // 2 and j == kh // 2)]
    kk = len(taps)
    off = offset.reshape(n, out[0], out[1], group, kk, 2)
    dt, dev = offset.dtype, offset.device
    a_h, a_w = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    ho = torch.arange(out[0], dtype=dt, device=dev).view(1, -1, 1, 1, 1) * sh - ph + a_h
    wo = torch.arange(out[1], dtype=dt, device=dev).view(1, 1, -1, 1, 1) * sw - pw + a_w
    tj = torch.tensor([j * dh - a_h for j, _ in taps], dtype=dt, device=dev)
    ti = torch.tensor([i * dw - a_w for _, i in taps], dtype=dt, device=dev)
    y = ho + (tj + off[..., 1]) * offset_scale
    x = wo + (ti + off[..., 0]) * offset_scale
    pos = torch.stack([y, x], dim=-1)  # (N, Ho, Wo, G, K', 2)
    return pos.permute(0, 3, 1, 2, 4, 5).reshape(n, group, -1, 2)


def _dcn_out(
    h: int, w: int, kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int]:
    return (
        output_size(h, kernel[0], stride[0], 2 * pad[0], dilation[0]),
        output_size(w, kernel[1], stride[1], 2 * pad[1], dilation[1]),
    )


def dcnv3_core_reference(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool = False,
) -> Tensor:
    """InternImage's DCNv3 core op as its CUDA kernel computes it, with the strict gradient rule.

    ``out[n, ho, wo, g * D + c] = sum_t mask[n, ho, wo, g, t] * sample(input[n, :, :, g * D + c],
    y_t, x_t)``, ``D = group_channels``, over the ``K' = kh * kw`` taps (``K' - 1`` with
    ``remove_center``, the centre ``(kh // 2, kw // 2)`` skipped), taps x-major, at
    ``x_t = wo * sw - pw + a_w + ((i * dw - a_w) + offset[..., (g * K' + t) * 2]) * offset_scale``,
    ``a_w = dw * (kw - 1) // 2``, and ``y_t`` likewise with ``offset[..., (g * K' + t) * 2 + 1]``.
    No weight, no softmax (the module applies it to the mask before the core).

    Args:
        input: channels-last ``(N, H, W, G * D)``.
        offset: ``(N, Ho, Wo, G * K' * 2)``, ``(x, y)`` per tap.
        mask: ``(N, Ho, Wo, G * K')``.
        kernel_h: the kernel's height.
        kernel_w: the kernel's width.
        stride_h: the vertical stride.
        stride_w: the horizontal stride.
        pad_h: the vertical padding (symmetric, zeros).
        pad_w: the horizontal padding (symmetric, zeros).
        dilation_h: the vertical dilation.
        dilation_w: the horizontal dilation.
        group: ``G``, the number of groups.
        group_channels: ``D``, the channels per group.
        offset_scale: the scale of the offsets and the taps around the window's centre.
        remove_center: skip the centre tap (odd kernels only). Default: False.

    Returns:
        ``(N, Ho, Wo, G * D)``.

    Raises:
        ValueError: shapes that do not fit together.

    """
    n, h, w, c = input.shape
    if c != group * group_channels:
        raise ValueError(f"Expected input channels group * group_channels = {group * group_channels}, got {c}.")
    if remove_center and (kernel_h % 2 == 0 or kernel_w % 2 == 0):
        raise ValueError(f"remove_center needs an odd kernel; got kernel_h={kernel_h}, kernel_w={kernel_w}.")
    kernel, stride = (kernel_h, kernel_w), (stride_h, stride_w)
    pad, dil = (pad_h, pad_w), (dilation_h, dilation_w)
    out = _dcn_out(h, w, kernel, stride, pad, dil)
    kk = kernel_h * kernel_w - int(remove_center)
    if tuple(offset.shape) != (n, *out, group * kk * 2) or tuple(mask.shape) != (n, *out, group * kk):
        raise ValueError(
            f"Expected offset {(n, *out, group * kk * 2)} and mask {(n, *out, group * kk)}, "
            f"got {tuple(offset.shape)} and {tuple(mask.shape)}."
        )
    pos = _dcn_positions(n, out, offset, kernel, stride, pad, dil, group, offset_scale, remove_center)
    values = sample_reference(input.permute(0, 3, 1, 2), pos, "strict")  # (N, G, D, Ho*Wo*K')
    values = values.reshape(n, group, group_channels, *out, kk)
    m = mask.reshape(n, *out, group, kk).permute(0, 3, 1, 2, 4)[:, :, None]
    return (values * m).sum(-1).permute(0, 3, 4, 1, 2).reshape(n, *out, c)


def dcnv4_core_reference(
    input: Tensor,
    offset_mask: Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool = False,
) -> Tensor:
    """DCNv4's core op as its CUDA kernel computes it (without its optional softmax), any kernel size.

    :func:`dcnv3_core_reference`'s sampling and sum, with the offsets and the mask packed in one
    tensor: per group ``g``, ``offset_mask[..., g * 3K' : g * 3K' + 2K']`` are the ``(x, y)``
    offsets of the ``K'`` taps and the next ``K'`` entries their mask; the last dimension is
    padded to a multiple of 8, the padding ignored. The geometry (``kernel_h`` to
    ``group_channels``), ``offset_scale`` and ``remove_center`` are as for
    :func:`dcnv3_core_reference`.

    Args:
        input: channels-last ``(N, H, W, G * D)``.
        offset_mask: ``(N, Ho, Wo, ceil(G * 3K' / 8) * 8)``.

    Returns:
        ``(N, Ho, Wo, G * D)``.

    Raises:
        ValueError: shapes that do not fit together.

    """
    kk = kernel_h * kernel_w - int(remove_center)
    packed = group * kk * 3
    width = -(-packed // 8) * 8
    if offset_mask.dim() != 4 or offset_mask.shape[-1] != width:
        raise ValueError(
            f"Expected offset_mask (N, Ho, Wo, {width}) (G * 3K' = {packed} padded to a multiple of 8), "
            f"got {tuple(offset_mask.shape)}."
        )
    lead = offset_mask.shape[:3]
    per_group = offset_mask[..., :packed].reshape(*lead, group, 3 * kk)
    offset = per_group[..., : 2 * kk].reshape(*lead, group * kk * 2)
    mask = per_group[..., 2 * kk :].reshape(*lead, group * kk)
    return dcnv3_core_reference(
        input,
        offset,
        mask,
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dilation_h,
        dilation_w,
        group,
        group_channels,
        offset_scale,
        remove_center,
    )
