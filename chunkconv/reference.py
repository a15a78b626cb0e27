"""The unchunked oracle: the forum recipe, generalised to every argument chunkconv takes.

It unfolds the whole input, runs the generator on all ``N * L`` patches at once
and contracts every patch with its weight, with plain autograd for backward.
Tests compare every chunkconv path against it; benchmarks use it as the
baseline. It is deliberately simple and deliberately memory-hungry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from .deform_reference import deform_sample_reference
from .execute import broadcast_bias
from .gather import guide_geometry, pad_input, position_axes
from .geometry import ConvGeometry, conv_spec_for_input

__all__ = ["dynamic_conv_reference", "unfold_patches"]


def unfold_patches(x_pad: Tensor, geom: ConvGeometry) -> Tensor:
    """Every patch of a padded input as rows ``(N * L, C * prod(kernel_size))``.

    Works for 1-3 spatial dims with stride and dilation, via ``Tensor.unfold``
    (``F.unfold`` is 2-D only); the row layout is ``F.unfold``'s.
    """
    d = geom.ndim
    windows = x_pad
    for axis, (k, s, dil) in enumerate(zip(geom.kernel_size, geom.stride, geom.dilation)):
        windows = windows.unfold(2 + axis, dil * (k - 1) + 1, s)
    # (N, C, *out, *receptive) -> take every dil-th tap of each window
    taps = (slice(None),) * (2 + d) + tuple(slice(None, None, dil) for dil in geom.dilation)
    windows = windows[taps]
    order = (0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return windows.permute(order).reshape(geom.num_patches, geom.patch_size)


def dynamic_conv_reference(
    input: Tensor,
    generator: Callable[..., Tensor],
    *,
    out_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    bias: Tensor | None = None,
    padding_mode: str = "zeros",
    method: Literal["forum", "einsum"] = "einsum",
    ndim: int | None = None,
    kernel: str = "full",
    weight: Tensor | None = None,
    kernel_groups: int | None = None,
    inputs: Sequence[str] = ("patches",),
    features: Tensor | None = None,
    guide: Tensor | None = None,
    offsets: Tensor | None = None,
    mask: Tensor | None = None,
    sampling_rule: str = "torchvision",
) -> Tensor:
    """Dynamic convolution with nothing chunked: every patch and every weight at once.

    Args:
        method: ``"forum"`` contracts as the forum post does (expand the
            patches, multiply by the weights, sum), materialising a product as
            large as the weights; ``"einsum"`` contracts with one batched
            matmul, the best unchunked PyTorch recipe (full kernels only).
        ndim: spatial dims; by default ``len(kernel_size)``, 2 for an int.
        offsets: a deformable call's offsets (torchvision's layout, as for
            ``chunkconv.dynamic_conv``): the patches are then the sampled ones, every one at
            once, from :func:`chunkconv.deform_reference.deform_sample_reference`.
        mask: a deformable call's mask, as for ``chunkconv.dynamic_conv``.
        sampling_rule: the offsets' gradient rule, as for ``chunkconv.dynamic_conv``.

    The other arguments (``kernel``, ``weight``, ``kernel_groups``, ``inputs``, ``features``,
    ``guide`` included) and the shapes are those of ``chunkconv.dynamic_conv``; ``in_channels``
    is read off the input. Every kernel form is computed here from its definition, with the
    side inputs and positions built for all locations at once.

    """
    spec = conv_spec_for_input(
        input.shape, ndim, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, "the reference"
    )
    unbatched = input.dim() == spec.ndim + 1
    batch = (lambda t: t.unsqueeze(0)) if unbatched else (lambda t: t)
    x = batch(input)
    geom = spec.geometry(x.shape)
    if offsets is None:
        patches = unfold_patches(pad_input(x, geom), geom)  # (N*L, C*K)
    else:
        patches = _sampled_patches(x, batch(offsets), None if mask is None else batch(mask), geom, sampling_rule)
    given = _generator_rows(
        patches,
        geom,
        inputs,
        batch(features) if features is not None else None,
        batch(guide) if guide is not None else None,
        x,
    )
    out_rows = generator(*(given[k] for k in inputs))
    out = _contract(out_rows, patches, geom, kernel, weight, kernel_groups, method)
    out = out.reshape(geom.batch, geom.locations_per_image, geom.out_channels).transpose(1, 2)
    y = out.reshape(geom.batch, geom.out_channels, *geom.out_spatial)
    if bias is not None:
        y = y + broadcast_bias(bias, geom.ndim).to(y.dtype)
    return y.squeeze(0) if unbatched else y


def _sampled_patches(x: Tensor, offsets: Tensor, mask: Tensor | None, geom: ConvGeometry, rule: str) -> Tensor:
    """Every sampled patch as rows ``(N * L, C * K)`` (offsets and mask in torchvision's layout)."""
    if geom.padding_mode != "zeros":
        raise ValueError(f"Deformable sampling pads with zeros only; got padding_mode={geom.padding_mode!r}.")
    n, k, d, out = geom.batch, geom.kernel_numel, geom.ndim, geom.out_spatial
    g = offsets.shape[1] // (k * d)
    # an asymmetric padding ("same" with an even kernel): zeros on the right of each axis, so that
    # the reference's symmetric output size is the call's (a zero pixel reads as outside)
    extra = [p[1] - p[0] for p in geom.pads]
    if any(extra):
        x = torch.nn.functional.pad(x, [v for e in reversed(extra) for v in (0, e)])
    columns = deform_sample_reference(
        x,
        offsets.reshape(n, g, k, d, *out),
        None if mask is None else mask.reshape(n, g, k, *out),
        kernel_size=geom.kernel_size,
        stride=geom.stride,
        padding=[p[0] for p in geom.pads],
        dilation=geom.dilation,
        rule=rule,
    )
    return (
        columns.reshape(n, geom.patch_size, geom.locations_per_image)
        .transpose(1, 2)
        .reshape(geom.num_patches, geom.patch_size)
    )


def _generator_rows(
    patches: Tensor,
    geom: ConvGeometry,
    inputs: Sequence[str],
    features: Tensor | None,
    guide: Tensor | None,
    x: Tensor,
) -> dict[str, Tensor]:
    """Every location's rows of each kind the generator may receive, all at once (batched side inputs)."""
    rows = geom.num_patches
    given = {"patches": patches}
    if features is not None:
        given["features"] = features.movedim(1, -1).reshape(rows, features.shape[1])
    if guide is not None:
        guide_geom = guide_geometry(geom, guide.shape[1])
        given["guide"] = unfold_patches(pad_input(guide, guide_geom), guide_geom)
    if "positions" in inputs:
        grids = torch.meshgrid(*position_axes(geom), indexing="ij")  # each (*out)
        per_image = torch.stack([c.reshape(-1) for c in grids], dim=1).to(x.dtype).to(x.device)
        given["positions"] = per_image.repeat(geom.batch, 1)
    return given


def _contract(
    out_rows: Tensor,
    patches: Tensor,
    geom: ConvGeometry,
    kernel: str,
    weight: Tensor | None,
    kernel_groups: int | None,
    method: str,
) -> Tensor:
    """Every location's output row ``(rows, out)``, from each kernel form's definition."""
    rows, groups_ = geom.num_patches, geom.groups
    per_group = geom.patch_size // groups_
    taps, c = geom.kernel_numel, geom.in_channels
    if kernel == "full":
        weights = out_rows.reshape(rows, groups_, geom.out_channels // groups_, per_group)
        grouped = patches.reshape(rows, groups_, per_group)
        if method == "forum":
            out = (grouped.unsqueeze(2).expand_as(weights) * weights).sum(-1)
        elif method == "einsum":
            out = torch.einsum("rgop,rgp->rgo", weights, grouped)
        else:
            raise ValueError(f"Invalid value for `method`; expected 'forum' or 'einsum', got {method=}.")
    elif kernel == "modulated":
        assert weight is not None, "kernel='modulated' needs `weight`"
        scale = out_rows.reshape(rows, out_rows[0].numel() // taps if rows else 1, taps)  # (rows, 1 or C, K)
        w = weight.reshape(groups_, geom.out_channels // groups_, c // groups_, taps)  # (G, Og, Cg, K)
        s = scale.expand(rows, c, taps).reshape(rows, groups_, 1, c // groups_, taps)
        per_location = w.unsqueeze(0) * s  # (rows, G, Og, Cg, K): every location's whole weight
        grouped = patches.reshape(rows, groups_, 1, c // groups_, taps)
        out = (per_location * grouped).sum(dim=(-2, -1))
    elif kernel == "shared":
        kg = kernel_groups or 1
        kernels = out_rows.reshape(rows, kg, 1, taps)
        out = (patches.reshape(rows, kg, c // kg, taps) * kernels).sum(-1)
    else:
        raise ValueError(f"Invalid value for `kernel`; expected 'full', 'modulated' or 'shared', got {kernel=}.")
    return out
