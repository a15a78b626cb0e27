"""Two published dynamic layers written with chunkconv's kernel forms, checked against their authors' code.

1. **Involution** (Li et al., "Involution: Inverting the Inherence of Convolution for Visual
   Recognition", CVPR 2021). At every output pixel a K x K kernel is generated from *that
   pixel's* C channels by a 1x1 bottleneck (``reduce -> BatchNorm -> ReLU -> span``), one kernel
   per group of C/G channels, and applied depthwise: output channel c at pixel p is
   ``sum_t H[p, group(c), t] * x[c, p * stride + t]``. With stride 2 the bottleneck reads the
   input average-pooled to the output resolution.

   In chunkconv: ``kernel="shared"`` with ``kernel_groups=G`` is exactly "one K x K kernel per
   group of consecutive channels, applied depthwise" (channel c uses group ``c // (C / G)``'s
   kernel, as in the official code), and ``inputs=("features",)`` hands the generator each
   output pixel's row of a feature map at the output resolution. So the bottleneck's first half
   (1x1 conv, BatchNorm, ReLU) runs on the (pooled) map as in the paper, BatchNorm in training
   mode included, and its last 1x1 conv (``span``, an ``nn.Linear``) is the generator: the
   ``(N, G * K * K, H, W)`` kernel tensor and the unfold of the input never exist.

2. **Pixel-adaptive convolution** (PAC; Su et al., "Pixel-Adaptive Convolutional Neural
   Networks", CVPR 2019). A static weight W is modulated per pixel by a Gaussian of guide-feature
   differences: ``v'_i = sum_j exp(-||f_i - f_j||^2 / 2) * W[p_i - p_j] v_j + b``.

   In chunkconv: ``kernel="modulated"`` (the layer owns the static ``weight``, the generator
   returns one scalar per tap) with ``inputs=("guide",)`` (the generator receives the guide's
   patches, windowed like the input). The generator computes the Gaussian from the guide patch;
   the modulated weight is never formed per pixel.

Each layer is checked in float64, output and gradients (input, guide, every parameter), against
a direct implementation that follows its authors' unfold-based PyTorch code (the official
involution's ``involution_naive.py``, and pacnet's native ``packernel2d`` + ``pacconv2d``
path) on the whole image. Small chunks make the check cover many chunks, some spanning two
images. The script prints the largest differences.

    python examples/familiar_layers.py
    python examples/familiar_layers.py --smoke   # smaller tensors (--quick is the same)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import chunkconv

# Small chunks, so that each check covers many chunks and chunks that straddle two images.
CHUNK_SIZE = 150

# ---------------------------------------------------------------------------------------------
# Involution


class Involution(nn.Module):
    """Involution as the paper defines it, the kernels applied by a ``kernel="shared"`` DynamicConv."""

    def __init__(self, channels: int, kernel_size: int, stride: int, group_channels: int = 4, reduction: int = 4):
        super().__init__()
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.groups = channels // group_channels
        # the official code's conv1: a 1x1 conv without bias, BatchNorm, ReLU, on the (pooled) map
        self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=False), nn.BatchNorm2d(channels // reduction), nn.ReLU()
        )
        # its conv2, a 1x1 conv to one K x K kernel per group: the generator, run on each pixel's row
        span = nn.Linear(channels // reduction, kernel_size * kernel_size * self.groups)
        self.involve = chunkconv.DynamicConv2d(
            span, channels, channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=False,
            kernel="shared", kernel_groups=self.groups, inputs=("features",), chunk_size=CHUNK_SIZE,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.involve(x, features=self.reduce(self.pool(x)))


def involution_direct(x: Tensor, inv: Involution) -> Tensor:
    """Involution as the official repository writes it without CUDA: 1x1 convs on the map, then unfold."""
    span = inv.involve.generator
    weight = F.conv2d(inv.reduce(inv.pool(x)), span.weight[:, :, None, None], span.bias)  # conv2(conv1(x))
    b, _, h, w = weight.shape
    k, g = inv.kernel_size, inv.groups
    weight = weight.view(b, g, k * k, h, w).unsqueeze(2)
    unfolded = F.unfold(x, k, 1, (k - 1) // 2, inv.stride).view(b, g, inv.channels // g, k * k, h, w)
    return (weight * unfolded).sum(dim=3).view(b, inv.channels, h, w)


def check_involution(size: int, stride: int, channels: int = 16, kernel_size: int = 7) -> dict[str, float]:
    inv = Involution(channels, kernel_size, stride).double()  # in training mode: BatchNorm uses batch statistics
    x = torch.randn(2, channels, size, size, dtype=torch.float64, requires_grad=True)
    return _compare(inv, lambda x: involution_direct(x, inv), (x,), list(inv.parameters()))


# ---------------------------------------------------------------------------------------------
# Pixel-adaptive convolution


class PacAffinity(nn.Module):
    """PAC's Gaussian adapting kernel as a generator: guide patch (B, Cf * K * K) -> one scalar per tap (B, K, K)."""

    def __init__(self, guide_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.guide_channels, self.kernel_size = guide_channels, kernel_size

    def forward(self, guide: Tensor) -> Tensor:
        k = self.kernel_size
        rows = guide.view(-1, self.guide_channels, k * k)
        centre = rows[:, :, k * k // 2 : k * k // 2 + 1]
        return torch.exp(-0.5 * (rows - centre).square().sum(1)).view(-1, k, k)


def pac_direct(v: Tensor, f: Tensor, weight: Tensor, bias: Tensor, kernel_size: int) -> Tensor:
    """PAC as pacnet's native path computes it: the adapting kernel from the unfolded guide, then unfold and einsum."""
    n, c, h, w = v.shape
    k, pad = kernel_size, kernel_size // 2
    guide_cols = F.unfold(f, k, 1, pad, 1).view(n, f.shape[1], k, k, h, w)
    centre = guide_cols[:, :, k // 2 : k // 2 + 1, k // 2 : k // 2 + 1]
    adapting = torch.exp(-0.5 * (guide_cols - centre).square().sum(dim=1, keepdim=True))  # (n, 1, k, k, h, w)
    cols = F.unfold(v, k, 1, pad, 1).view(n, c, k, k, h, w)
    return torch.einsum("ijklmn,ojkl->iomn", cols * adapting, weight) + bias.view(1, -1, 1, 1)


def check_pac(size: int, in_channels: int = 8, guide_channels: int = 3, out_channels: int = 8, kernel_size: int = 5):
    layer = chunkconv.DynamicConv2d(
        PacAffinity(guide_channels, kernel_size), in_channels, out_channels, kernel_size, padding=kernel_size // 2,
        kernel="modulated", inputs=("guide",), chunk_size=CHUNK_SIZE, dtype=torch.float64,
    )  # fmt: skip
    v = torch.randn(2, in_channels, size, size, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, guide_channels, size, size, dtype=torch.float64, requires_grad=True)
    return _compare(
        lambda v, f: layer(v, guide=f),
        lambda v, f: pac_direct(v, f, layer.weight, layer.bias, kernel_size),
        (v, f),
        [layer.weight, layer.bias],
    )


# ---------------------------------------------------------------------------------------------


def _compare(layer, direct, inputs: tuple[Tensor, ...], params: list[Tensor]) -> dict[str, float]:
    """Largest absolute differences of the outputs and of the gradients of ``inputs`` and ``params``."""
    y, y_direct = layer(*inputs), direct(*inputs)
    probe = torch.randn_like(y)  # a random upstream gradient, so every output element matters
    grads = torch.autograd.grad(y, [*inputs, *params], probe)
    grads_direct = torch.autograd.grad(y_direct, [*inputs, *params], probe)

    def largest(pairs) -> float:
        return max((a - b).abs().max().item() for a, b in pairs)

    n = len(inputs)
    diffs = {"output": (y - y_direct).abs().max().item(), "input grad": largest(zip(grads[:1], grads_direct[:1]))}
    if n > 1:
        diffs["guide grad"] = largest(zip(grads[1:n], grads_direct[1:n]))
    diffs["param grads"] = largest(zip(grads[n:], grads_direct[n:]))
    diffs["grad scale"] = max(g.abs().max().item() for g in grads_direct)
    diffs["output scale"] = y_direct.abs().max().item()
    return diffs


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=48, help="image side in pixels (even)")
    parser.add_argument("--smoke", "--quick", action="store_true", help="small tensors (smoke test)")
    args = parser.parse_args(argv)
    size = 20 if args.smoke else args.size  # stride 2: 2 x 10 x 10 = 200 patches, two chunks, one spanning both images
    torch.manual_seed(0)
    checks = {
        "involution": lambda: check_involution(size, stride=1),
        "involution, stride 2": lambda: check_involution(size, stride=2),
        "pixel-adaptive conv": lambda: check_pac(size),
    }
    results = {}
    for name, check in checks.items():
        print(f"{name} ({size}x{size}, float64), chunkconv vs the authors' unfold-based code:")
        diffs = check()
        shown = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items() if not k.endswith("scale"))
        print(f"  max |difference|: {shown}  (outputs up to {diffs['output scale']:.2f}, "
              f"gradients up to {diffs['grad scale']:.2f})")  # fmt: skip
        results[name] = diffs
    return results


if __name__ == "__main__":
    main()
