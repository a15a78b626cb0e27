"""Five published layers, each written twice: the way its authors wrote it, and through chunkconv.

Each layer is an ``nn.Module`` that owns its parameters and computes the same thing two ways:

* ``direct(x, **side)``: the authors' unfold-based implementation, plain autograd: ``F.unfold``
  the whole input (and the guide), form every per-location kernel, multiply, sum. Its memory grows
  with ``C * k*k * H * W``, and autograd keeps those tensors for backward.
* ``chunked(x, **side, budget=...)``: one call of ``chunkconv.dynamic_conv2d`` with the
  ``kernel=`` / ``inputs=`` arguments of issue 14, on the same parameters.

The layers (``LAYERS``), with what a direct implementation looks like:

* ``kpn``: kernel prediction / dynamic filter network. A predictor branch gives per-pixel
  features ``(N, F, H, W)``; its last 1x1 conv makes a ``k x k`` kernel per pixel, softmax
  normalised, shared by all channels (Mildenhall et al. 2018, Jia et al. 2016).
  chunkconv: ``kernel="shared"``, ``inputs=("features",)``, generator ``Linear(F, k*k) -> Softmax``.
* ``pac``: pixel-adaptive convolution (Su et al. 2019) guided by another image: ``W[o, c, t] *
  exp(-||g_centre - g_t||^2 / 2)``, the guide ``(N, G, H, W)`` windowed like the input; direct is
  ``packernel2d`` + ``pacconv2d`` with ``native_impl=True`` (unfold, multiply, einsum).
  chunkconv: ``kernel="modulated"``, ``inputs=("guide",)``.
* ``psf``: spatially varying blur, a lens PSF: a normalised Gaussian per pixel whose width
  grows with the distance from the image centre, ``sigma = exp(a0 + a1 * r^2 + a2 * y + a3 * x)``
  pixels (learnable coefficients), shared by all channels. chunkconv: ``kernel="shared"``, ``inputs=("positions",)``.
* ``involution``: Li et al. (CVPR'21), the official ``involution_naive.py``: a kernel per pixel
  from that pixel's channels by a 1x1-conv bottleneck (``C -> C/4``, BN, ReLU, ``-> G*k*k``),
  ``G = C/16`` groups of consecutive channels. chunkconv: ``kernel="shared"``,
  ``kernel_groups=G``, ``inputs=("features",)`` with the input itself as the features. BN runs
  on its running statistics (``eval()``, as mmdet's ``norm_eval=True``): in training mode its
  statistics would couple all locations, which no chunked generator can reproduce.
* ``dcn-mask``: DCNv2's modulation mask with zero offsets: a side 1x1 conv of features gives a
  sigmoid mask ``(N, k*k, H, W)``; direct is mmcv's modulated im2col then one GEMM with the
  static weight. chunkconv: ``kernel="modulated"``, ``inputs=("features",)``, generator
  ``Linear(F, k*k) -> Sigmoid``.

The sizes benchmarked are :func:`workloads`'s (the shapes below): 256 x 256 for every layer, where both are
measured; 1024 x 1024 for every layer and 2048 x 2048 for ``psf``, where chunkconv runs within
a 1 GB budget and the direct implementation needs many GB. Pure definitions: nothing is
computed at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import chunkconv

__all__ = [
    "LAYERS",
    "DcnMask",
    "GuideGaussian",
    "Involution",
    "KernelPrediction",
    "Layer",
    "LayerWorkload",
    "PixelAdaptiveConv",
    "RadialGaussianPSF",
    "SpatiallyVaryingBlur",
    "build_layer",
    "workloads",
]


def _conv_weight(out_channels: int, in_channels: int, k: int) -> tuple[nn.Parameter, nn.Parameter]:
    """A static weight and bias initialised as ``nn.Conv2d`` does."""
    weight = nn.Parameter(torch.empty(out_channels, in_channels, k, k))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(in_channels * k * k)
    bias = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound))
    return weight, bias


class Layer(nn.Module):
    """A layer computed two ways on the same parameters: :meth:`direct` and :meth:`chunked`.

    Subclasses name their side inputs (``features``, ``guide``: tensors beside ``x`` that the
    caller passes by keyword) in ``side_inputs`` and implement :meth:`direct` and
    :meth:`chunkconv_call`, the arguments of their ``chunkconv.dynamic_conv2d`` call.
    """

    side_inputs: tuple[str, ...] = ()

    def direct(self, x: Tensor, **side: Tensor) -> Tensor:
        """The authors' unfold-based implementation."""
        raise NotImplementedError

    def chunkconv_call(self, x: Tensor, **side: Tensor) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of ``chunkconv.dynamic_conv2d(x, *args, **kwargs)`` for this layer."""
        raise NotImplementedError

    def chunked(
        self, x: Tensor, *, budget: str | int = "auto", chunk_size: int | None = None, **side: Tensor
    ) -> Tensor:
        """The layer through chunkconv: one ``dynamic_conv2d`` call with ``budget`` (or ``chunk_size``)."""
        args, kwargs = self.chunkconv_call(x, **side)
        return chunkconv.dynamic_conv2d(x, *args, **kwargs, budget=budget, chunk_size=chunk_size)

    def plan(self, x: Tensor, *, budget: str | int = "auto", **side: Tensor) -> chunkconv.Plan:
        """chunkconv's plan for :meth:`chunked` on ``x`` (training: forward and backward)."""
        args, kwargs = self.chunkconv_call(x, **side)
        return chunkconv.plan(x, *args, **kwargs, budget=budget, training=True)


class KernelPrediction(Layer):
    """KPN's filtering layer: a softmax-normalised ``k x k`` kernel per pixel, shared by all channels.

    Args:
        channels: channels of the filtered image ``x``.
        features: channels ``F`` of the predictor's per-pixel features.
        kernel_size: ``k`` (odd). Default: ``11``.
        softmax: normalise each pixel's kernel with a softmax over its taps. Default: ``True``.
    """

    side_inputs = ("features",)

    def __init__(self, channels: int, features: int, kernel_size: int = 11, softmax: bool = True) -> None:
        super().__init__()
        self.channels, self.kernel_size, self.softmax = channels, kernel_size, softmax
        self.predictor = nn.Linear(features, kernel_size**2)  # the predictor's last 1x1 conv, (K, F)
        self.generator = nn.Sequential(self.predictor, nn.Softmax(dim=-1)) if softmax else self.predictor

    def direct(self, x: Tensor, features: Tensor) -> Tensor:
        n, c, h, w = x.shape
        k, taps = self.kernel_size, self.kernel_size**2
        kernel = F.conv2d(features, self.predictor.weight[:, :, None, None], self.predictor.bias)  # (N, K, H, W)
        if self.softmax:
            kernel = kernel.softmax(dim=1)
        cols = F.unfold(x, k, padding=k // 2).view(n, c, taps, h * w)
        return (cols * kernel.view(n, 1, taps, h * w)).sum(dim=2).view(n, c, h, w)

    def chunkconv_call(self, x: Tensor, features: Tensor) -> tuple[tuple, dict]:
        k = self.kernel_size
        return (self.generator, self.channels, k), dict(
            padding=k // 2, kernel="shared", inputs=("features",), features=features
        )


class GuideGaussian(nn.Module):
    """PAC's fixed Gaussian kernel from guide patch rows ``(B, G * K)``: ``exp(-||g_t - g_centre||^2 / 2)``.

    Returns one scalar per tap, ``(B, K)``; the centre tap is ``K // 2`` (odd kernels).
    """

    def __init__(self, guide_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.guide_channels, self.taps = guide_channels, kernel_size**2

    def forward(self, rows: Tensor) -> Tensor:
        g = rows.view(rows.shape[0], self.guide_channels, self.taps)
        centre = self.taps // 2
        d = g - g[:, :, centre : centre + 1]
        return torch.exp(-0.5 * d.square().sum(dim=1))


class PixelAdaptiveConv(Layer):
    """Pixel-adaptive convolution (PAC, Su et al. 2019) with a fixed Gaussian kernel on a guide image.

    Args:
        in_channels: channels of ``x``.
        out_channels: channels of the output.
        guide_channels: channels ``G`` of the guide.
        kernel_size: ``k`` (odd). Default: ``5``.
    """

    side_inputs = ("guide",)

    def __init__(self, in_channels: int, out_channels: int, guide_channels: int, kernel_size: int = 5) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight, self.bias = _conv_weight(out_channels, in_channels, kernel_size)
        self.generator = GuideGaussian(guide_channels, kernel_size)

    def direct(self, x: Tensor, guide: Tensor) -> Tensor:
        n, c, h, w = x.shape
        k, p = self.kernel_size, self.kernel_size // 2
        # packernel2d(native_impl=True): the guide's unfolded differences to its centre tap
        g = F.unfold(guide, k, padding=p).view(n, guide.shape[1], k * k, h, w)
        centre = k * k // 2
        g = g - g[:, :, centre : centre + 1]
        kernel = torch.exp(g.mul(g).sum(dim=1, keepdim=True).mul(-0.5)).view(n, 1, k, k, h, w)
        # pacconv2d(native_impl=True): im2col of the input, times the kernel, einsum with the weight
        cols = F.unfold(x, k, padding=p).view(n, c, k, k, h, w)
        out = torch.einsum("ijklmn,ojkl->iomn", cols * kernel, self.weight)
        return out + self.bias.view(1, -1, 1, 1)

    def chunkconv_call(self, x: Tensor, guide: Tensor) -> tuple[tuple, dict]:
        k = self.kernel_size
        return (self.generator, self.out_channels, k), dict(
            bias=self.bias, padding=k // 2, kernel="modulated", weight=self.weight, inputs=("guide",), guide=guide
        )


class RadialGaussianPSF(nn.Module):
    """A lens PSF: a normalised ``k x k`` Gaussian whose width grows away from the optical centre.

    Maps positions ``(B, 2)`` (row ``y``, column ``x``, normalised to ``[-1, 1]``) to kernels
    ``(B, k*k)`` that sum to 1, of width ``sigma = exp(a0 + a1 * (y^2 + x^2) + a2 * y + a3 * x)``
    pixels; ``a2``, ``a3`` (zero by default) tilt the focal plane. All four are learnable.
    """

    def __init__(self, kernel_size: int, a0: float = 0.0, a1: float = 0.5) -> None:
        super().__init__()
        self.coefficients = nn.Parameter(torch.tensor([a0, a1, 0.0, 0.0]))
        r = torch.arange(kernel_size) - kernel_size // 2
        self.register_buffer("offsets2", (r[:, None] ** 2 + r[None, :] ** 2).flatten().float(), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        a = self.coefficients
        y, x = positions[:, 0:1], positions[:, 1:2]
        log_sigma = a[0] + a[1] * (y * y + x * x) + a[2] * y + a[3] * x
        logits = -0.5 * self.offsets2.to(positions.dtype) * torch.exp(-2 * log_sigma)
        return logits.softmax(dim=1)


class SpatiallyVaryingBlur(Layer):
    """Blur each pixel with its own PSF, a function of the pixel's position (shared by all channels).

    Args:
        channels: channels of ``x``.
        kernel_size: ``k`` (odd). Default: ``11``.
    """

    def __init__(self, channels: int, kernel_size: int = 11) -> None:
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.psf = RadialGaussianPSF(kernel_size)

    def direct(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        k, taps = self.kernel_size, self.kernel_size**2
        # every pixel's centre, normalised as grid_sample(align_corners=False) does: row first
        ys = (2 * torch.arange(h, dtype=x.dtype, device=x.device) + 1) / h - 1
        xs = (2 * torch.arange(w, dtype=x.dtype, device=x.device) + 1) / w - 1
        positions = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).view(h * w, 2)
        kernel = self.psf(positions).t()  # (K, H*W), one kernel per location for all images
        cols = F.unfold(x, k, padding=k // 2).view(n, c, taps, h * w)
        return (cols * kernel).sum(dim=2).view(n, c, h, w)

    def chunkconv_call(self, x: Tensor) -> tuple[tuple, dict]:
        k = self.kernel_size
        return (self.psf, self.channels, k), dict(padding=k // 2, kernel="shared", inputs=("positions",))


class Involution(Layer):
    """Involution (Li et al., CVPR'21): a kernel per pixel from its own channels, shared by groups of 16.

    Args:
        channels: ``C`` (a multiple of ``group_channels``).
        kernel_size: ``k`` (odd). Default: ``7``.
        group_channels: channels sharing one kernel. Default: ``16`` (so ``G = C / 16``).
        reduction_ratio: the bottleneck's reduction. Default: ``4``.
    """

    def __init__(self, channels: int, kernel_size: int = 7, group_channels: int = 16, reduction_ratio: int = 4) -> None:
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.group_channels, self.groups = group_channels, channels // group_channels
        hidden = channels // reduction_ratio
        self.reduce = nn.Linear(channels, hidden, bias=False)  # conv1's 1x1 conv (no bias before its BN)
        self.norm = nn.BatchNorm1d(hidden)
        self.span = nn.Linear(hidden, self.groups * kernel_size**2)  # conv2's 1x1 conv
        self.generator = nn.Sequential(self.reduce, self.norm, nn.ReLU(), self.span)

    def direct(self, x: Tensor) -> Tensor:
        # involution_naive.py: weight = self.conv2(self.conv1(x)) with conv1 = 1x1 conv + BN + ReLU
        bn = self.norm
        weight = F.conv2d(x, self.reduce.weight[:, :, None, None])
        weight = F.batch_norm(weight, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum,
                              bn.eps)  # fmt: skip
        weight = F.conv2d(F.relu(weight), self.span.weight[:, :, None, None], self.span.bias)
        b, c, h, w = weight.shape
        k, taps = self.kernel_size, self.kernel_size**2
        weight = weight.view(b, self.groups, taps, h, w).unsqueeze(2)
        out = F.unfold(x, k, 1, (k - 1) // 2, 1).view(b, self.groups, self.group_channels, taps, h, w)
        return (weight * out).sum(dim=3).view(b, self.channels, h, w)

    def chunkconv_call(self, x: Tensor) -> tuple[tuple, dict]:
        k = self.kernel_size  # the kernel of each pixel is made from its own channels: x is the features
        return (self.generator, self.channels, k), dict(
            padding=(k - 1) // 2, kernel="shared", kernel_groups=self.groups, inputs=("features",), features=x
        )


class DcnMask(Layer):
    """DCNv2's modulated convolution with zero offsets: a static conv of ``x`` times a per-tap sigmoid mask.

    Args:
        in_channels: channels of ``x``.
        out_channels: channels of the output.
        features: channels ``F`` of the side branch's features.
        kernel_size: ``k`` (odd). Default: ``3``.
    """

    side_inputs = ("features",)

    def __init__(self, in_channels: int, out_channels: int, features: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight, self.bias = _conv_weight(out_channels, in_channels, kernel_size)
        self.mask = nn.Linear(features, kernel_size**2)  # the side branch's 1x1 conv, (K, F)
        self.generator = nn.Sequential(self.mask, nn.Sigmoid())

    def direct(self, x: Tensor, features: Tensor) -> Tensor:
        n, c, h, w = x.shape
        k, taps = self.kernel_size, self.kernel_size**2
        mask = torch.sigmoid(F.conv2d(features, self.mask.weight[:, :, None, None], self.mask.bias))
        # mmcv's modulated_deformable_im2col with zero offsets, then weight.view(O, -1) @ columns
        cols = F.unfold(x, k, padding=k // 2).view(n, c, taps, h * w) * mask.view(n, 1, taps, h * w)
        out = self.weight.view(self.out_channels, c * taps) @ cols.view(n, c * taps, h * w)
        return (out + self.bias.view(1, -1, 1)).view(n, self.out_channels, h, w)

    def chunkconv_call(self, x: Tensor, features: Tensor) -> tuple[tuple, dict]:
        k = self.kernel_size
        return (self.generator, self.out_channels, k), dict(
            bias=self.bias, padding=k // 2, kernel="modulated", weight=self.weight, inputs=("features",),
            features=features,
        )  # fmt: skip


LAYERS: dict[str, type[Layer]] = {
    "kpn": KernelPrediction,
    "pac": PixelAdaptiveConv,
    "psf": SpatiallyVaryingBlur,
    "involution": Involution,
    "dcn-mask": DcnMask,
}


# the constructor argument that sets each side input's channels
_SIDE_CHANNELS = {"features": "features", "guide": "guide_channels"}


@dataclass(frozen=True)
class LayerWorkload:
    """One layer at one size: ``batch x channels x size x size`` in, the layer's own arguments in ``params``.

    ``budget`` is chunkconv's; ``params`` holds the layer's constructor arguments besides
    ``channels``/``in_channels`` (e.g. ``features``, ``kernel_size``), as ``(name, value)`` pairs.
    """

    layer: str
    size: int
    batch: int
    channels: int
    params: tuple[tuple[str, int], ...] = field(default=())
    budget: str = "auto"

    @property
    def name(self) -> str:
        return f"{self.layer}-{self.size}"

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    @property
    def out_channels(self) -> int:
        return self.kwargs.get("out_channels", self.channels)

    @property
    def side_channels(self) -> dict[str, int]:
        """Channels of each side input the layer takes (``features``, ``guide``)."""
        return {name: self.kwargs[_SIDE_CHANNELS[name]] for name in LAYERS[self.layer].side_inputs}

    def describe(self) -> str:
        args = " ".join(f"{'k' if n == 'kernel_size' else n}={v}" for n, v in self.params)
        return f"N={self.batch} C={self.channels} {self.size}x{self.size} {args}".strip()

    def as_dict(self) -> dict:
        return {"layer": self.layer, "name": self.name, "size": self.size, "batch": self.batch,
                "channels": self.channels, "params": dict(self.params), "budget": self.budget,
                "describe": self.describe()}  # fmt: skip


def build_layer(wl: LayerWorkload, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Layer:
    """The layer of ``wl`` with seeded, non-trivial parameters (BN statistics too), in ``eval()`` mode.

    ``eval()`` matters only for involution's BN (its running statistics); every parameter still
    requires a gradient.
    """
    layer = LAYERS[wl.layer](wl.channels, **wl.kwargs)
    if isinstance(layer, Involution):
        with torch.no_grad():
            layer.norm.running_mean.uniform_(-0.2, 0.2)
            layer.norm.running_var.uniform_(0.5, 1.5)
            layer.norm.weight.uniform_(0.5, 1.5)
            layer.norm.bias.uniform_(-0.2, 0.2)
    return layer.to(device=device, dtype=dtype).eval()


# The sizes benchmarked. Per layer: the shape at 256 x 256, then larger images with a 1 GB budget.
_SHAPES: dict[str, tuple[int, int, tuple[tuple[str, int], ...]]] = {
    # layer: (batch, channels, params)
    "kpn": (1, 3, (("features", 32), ("kernel_size", 11))),
    "pac": (1, 16, (("out_channels", 16), ("guide_channels", 8), ("kernel_size", 5))),
    "psf": (1, 3, (("kernel_size", 11),)),
    "involution": (1, 32, (("kernel_size", 7),)),
    "dcn-mask": (1, 32, (("out_channels", 32), ("features", 16), ("kernel_size", 3))),
}
# 2048 px for psf, a blur of a large photo: 3 channels, so chunkconv's buffers of input size fit 1 GB
# (dcn-mask's 32 channels at 2048 px need 1.9 GiB of them: padded input, padded and plain gradient)
_LARGE = {"kpn": (1024,), "pac": (1024,), "psf": (1024, 2048), "involution": (1024,), "dcn-mask": (1024,)}
# --quick: the same layers, few channels, tiny images (seconds in all)
_QUICK: dict[str, tuple[int, int, tuple[tuple[str, int], ...]]] = {
    "kpn": (2, 2, (("features", 4), ("kernel_size", 5))),
    "pac": (2, 3, (("out_channels", 4), ("guide_channels", 2), ("kernel_size", 3))),
    "psf": (2, 2, (("kernel_size", 5),)),
    "involution": (2, 32, (("kernel_size", 3),)),
    "dcn-mask": (2, 3, (("out_channels", 4), ("features", 4), ("kernel_size", 3))),
}


def workloads(
    layers: tuple[str, ...] | None = None, *, quick: bool = False, sizes: tuple[int, ...] | None = None,
    budget: str | None = None,
) -> list[LayerWorkload]:  # fmt: skip
    """The benchmarked workloads, layer by layer: 256 px (default budget), then 1024 px and up (``budget``).

    ``quick``: tiny shapes at 16 and 32 px. ``sizes`` replaces the sizes of every layer; sizes
    above the first (256 px, or 16 px when ``quick``) get ``budget`` (default: 1GB, or 32MB when
    ``quick``), the first chunkconv's default.
    """
    shapes = _QUICK if quick else _SHAPES
    small = 16 if quick else 256
    budget = budget or ("32MB" if quick else "1GB")
    out = []
    for layer in layers or tuple(LAYERS):
        if layer not in LAYERS:
            raise ValueError(f"Invalid value for `layers`; expected names from {tuple(LAYERS)}, got {layer!r}.")
        batch, channels, params = shapes[layer]
        for size in sizes or ((16, 32) if quick else (256, *_LARGE[layer])):
            out.append(LayerWorkload(layer, size, batch, channels, params, budget="auto" if size <= small else budget))
    return out
