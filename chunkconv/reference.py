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

from .execute import broadcast_bias
from .gather import pad_input
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
    generator: Callable[[Tensor], Tensor],
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
) -> Tensor:
    """Dynamic convolution with nothing chunked: every patch and every weight at once.

    Args:
        method: ``"forum"`` contracts as the forum post does (expand the
            patches, multiply by the weights, sum), materialising a product as
            large as the weights; ``"einsum"`` contracts with one batched
            matmul, the best unchunked PyTorch recipe.
        ndim: spatial dims; by default ``len(kernel_size)``, 2 for an int.

    The other arguments and the shapes are those of ``chunkconv.dynamic_conv``;
    ``in_channels`` is read off the input.

    """
    spec = conv_spec_for_input(
        input.shape, ndim, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, "the reference"
    )
    unbatched = input.dim() == spec.ndim + 1
    x = input.unsqueeze(0) if unbatched else input
    geom = spec.geometry(x.shape)
    patches = unfold_patches(pad_input(x, geom), geom)  # (N*L, C*K)
    rows, groups_ = geom.num_patches, geom.groups
    per_group = geom.patch_size // groups_
    weights = generator(patches).reshape(rows, groups_, geom.out_channels // groups_, per_group)
    grouped = patches.reshape(rows, groups_, per_group)
    if method == "forum":
        out = (grouped.unsqueeze(2).expand_as(weights) * weights).sum(-1)
    elif method == "einsum":
        out = torch.einsum("rgop,rgp->rgo", weights, grouped)
    else:
        raise ValueError(f"Invalid value for `method`; expected 'forum' or 'einsum', got {method=}.")
    out = out.reshape(geom.batch, geom.locations_per_image, geom.out_channels).transpose(1, 2)
    y = out.reshape(geom.batch, geom.out_channels, *geom.out_spatial)
    if bias is not None:
        y = y + broadcast_bias(bias, geom.ndim).to(y.dtype)
    return y.squeeze(0) if unbatched else y
