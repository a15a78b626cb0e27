"""Two published dynamic layers written as chunkconv generators, checked against direct implementations.

1. **Involution** (Li et al., "Involution: Inverting the Inherence of Convolution for Visual
   Recognition", CVPR 2021). At every pixel a K x K kernel is generated from *that pixel's*
   C channels by a 1x1 bottleneck (``reduce -> BatchNorm -> ReLU -> span``), one kernel per
   group of C/G channels, and applied depthwise: output channel c at pixel p is
   ``sum_t H[p, group(c), t] * x[c, p + t]``.

   As a generator: the patch row holds the whole C x K x K patch in ``F.unfold`` order (channel
   slowest, then the kernel offsets), so the centre pixel's channels are
   ``row.view(C, K*K)[:, K*K // 2]``. Involution is depthwise, so it is exactly a
   ``DynamicConv`` with ``groups=C`` whose weight ``(C, 1, K, K)`` repeats each group's kernel for
   the C/G channels of that group (channels ``g*C/G ... (g+1)*C/G - 1``, as in the official code).
   Nothing is approximated; the only cost is that the generator sees the K*K - 1 neighbours it
   ignores.

2. **Pixel-adaptive convolution** (PAC; Su et al., "Pixel-Adaptive Convolutional Neural
   Networks", CVPR 2019). A static weight W is modulated per pixel by a Gaussian of guide-feature
   differences: ``v'_i = sum_j exp(-||f_i - f_j||^2 / 2) * W[p_i - p_j] v_j + b``.

   The guide f is a second tensor, and a generator only sees the patch of its input, so the guide
   rides along as extra input channels: the input is ``cat(v, f)``, the generator computes the
   Gaussian from the guide part of the patch, and returns ``W`` times it for the v channels and
   zeros for the guide channels (which therefore contribute nothing to the output).

Each layer is checked in float64, output and gradients (input and parameters), against a direct
implementation written here with ``F.unfold`` on the whole image; the script prints the largest
differences.

    python examples/familiar_layers.py
    python examples/familiar_layers.py --quick   # smaller tensors
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import chunkconv

# Small chunks, so that each check covers many chunks and chunks that straddle two images.
CHUNK_SIZE = 500

# ---------------------------------------------------------------------------------------------
# Involution


class InvolutionKernel(nn.Module):
    """Involution's kernel generation: centre pixel (C,) -> one K x K kernel per group of channels."""

    def __init__(self, channels: int, kernel_size: int, groups: int, reduction: int = 4) -> None:
        super().__init__()
        self.channels, self.kernel_size, self.groups = channels, kernel_size, groups
        self.reduce = nn.Linear(channels, channels // reduction, bias=False)  # a 1x1 conv
        self.norm = nn.BatchNorm1d(channels // reduction)
        self.span = nn.Linear(channels // reduction, kernel_size * kernel_size * groups)  # a 1x1 conv

    def forward(self, pixels: Tensor) -> Tensor:  # (B, C) -> (B, G, K*K)
        return self.span(torch.relu(self.norm(self.reduce(pixels)))).view(-1, self.groups, self.kernel_size**2)


class InvolutionGenerator(nn.Module):
    """The chunkconv generator: patch row (B, C*K*K) -> depthwise weight (B, C, 1, K, K)."""

    def __init__(self, kernel: InvolutionKernel) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, patches: Tensor) -> Tensor:
        c, k, g = self.kernel.channels, self.kernel.kernel_size, self.kernel.groups
        centre = patches.view(-1, c, k * k)[:, :, k * k // 2]  # the centre pixel's C channels
        h = self.kernel(centre)  # (B, G, K*K)
        return h.unsqueeze(2).expand(-1, g, c // g, k * k).reshape(-1, c, 1, k, k)


def involution_direct(x: Tensor, kernel: InvolutionKernel) -> Tensor:
    """Involution as the official repository writes it without CUDA: 1x1 convs on the map, then unfold."""
    n, c, h, w = x.shape
    k, g = kernel.kernel_size, kernel.groups
    weight = kernel(x.permute(0, 2, 3, 1).reshape(-1, c))  # the 1x1 bottleneck at every pixel
    weight = weight.view(n, h, w, g, k * k).permute(0, 3, 4, 1, 2).unsqueeze(2)  # (n, G, 1, K*K, h, w)
    unfolded = F.unfold(x, k, padding=(k - 1) // 2).view(n, g, c // g, k * k, h, w)
    return (weight * unfolded).sum(dim=3).view(n, c, h, w)


def check_involution(size: int, channels: int = 16, kernel_size: int = 7, groups: int = 4) -> dict[str, float]:
    kernel = InvolutionKernel(channels, kernel_size, groups).double()
    layer = chunkconv.DynamicConv(
        InvolutionGenerator(kernel), channels, channels, kernel_size,
        padding=kernel_size // 2, groups=channels, bias=False, chunk_size=CHUNK_SIZE,
    )
    x = torch.randn(2, channels, size, size, dtype=torch.float64, requires_grad=True)
    try:
        layer(x)
    except chunkconv.BatchCoupledGeneratorError as error:
        # BatchNorm in training mode normalises with the statistics of whichever patches share a
        # chunk, so its output would depend on the chunking: chunkconv refuses it.
        print(f"  in training mode chunkconv refuses it: {str(error).split('. ')[0]}.")
    layer.eval()  # BatchNorm uses its running statistics: every patch is independent
    with torch.no_grad():  # non-trivial running statistics, so the check means something
        kernel.norm.running_mean.uniform_(-0.5, 0.5)
        kernel.norm.running_var.uniform_(0.5, 2.0)
    return _compare(layer, lambda x: involution_direct(x, kernel), x, list(kernel.parameters()))


# ---------------------------------------------------------------------------------------------
# Pixel-adaptive convolution


class PacGenerator(nn.Module):
    """PAC as a generator: patch of cat(v, f) -> W * exp(-||f_j - f_centre||^2 / 2), zero for f."""

    def __init__(self, in_channels: int, guide_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.cv, self.cf, self.k = in_channels, guide_channels, kernel_size
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) * 0.2)

    def forward(self, patches: Tensor) -> Tensor:
        taps = self.k * self.k
        rows = patches.view(-1, self.cv + self.cf, taps)
        guide = rows[:, self.cv :]  # (B, Cf, K*K)
        gauss = torch.exp(-0.5 * (guide - guide[:, :, taps // 2 : taps // 2 + 1]).square().sum(1))  # (B, K*K)
        w = self.weight.flatten(2) * gauss[:, None, None, :]  # (B, out, Cv, K*K)
        return F.pad(w, (0, 0, 0, self.cf)).flatten(1)  # zero weights for the guide channels: (B, out*(Cv+Cf)*K*K)


def pac_direct(v: Tensor, f: Tensor, weight: Tensor, bias: Tensor, kernel_size: int) -> Tensor:
    """PAC with unfold, as in the paper's equation (the guide is zero-padded like the input)."""
    n, _, h, w = v.shape
    k, pad = kernel_size, kernel_size // 2
    fu = F.unfold(f, k, padding=pad).view(n, f.shape[1], k * k, h * w)
    gauss = torch.exp(-0.5 * (fu - fu[:, :, k * k // 2 : k * k // 2 + 1]).square().sum(1))  # (n, K*K, L)
    vu = F.unfold(v, k, padding=pad).view(n, v.shape[1], k * k, h * w)
    out = torch.einsum("ock,nckl,nkl->nol", weight.flatten(2), vu, gauss)
    return out.view(n, -1, h, w) + bias.view(1, -1, 1, 1)


def check_pac(size: int, in_channels: int = 8, guide_channels: int = 3, out_channels: int = 8, kernel_size: int = 5):
    gen = PacGenerator(in_channels, guide_channels, out_channels, kernel_size).double()
    layer = chunkconv.DynamicConv(
        gen, in_channels + guide_channels, out_channels, kernel_size, padding=kernel_size // 2, chunk_size=CHUNK_SIZE
    ).double()
    v = torch.randn(2, in_channels, size, size, dtype=torch.float64)
    f = torch.randn(2, guide_channels, size, size, dtype=torch.float64)
    x = torch.cat([v, f], dim=1).requires_grad_()  # gradients reach both v and the guide
    return _compare(
        layer,
        lambda x: pac_direct(x[:, :in_channels], x[:, in_channels:], gen.weight, layer.bias, kernel_size),
        x,
        [gen.weight, layer.bias],
    )


# ---------------------------------------------------------------------------------------------


def _compare(layer: nn.Module, direct, x: Tensor, params: list[Tensor]) -> dict[str, float]:
    """Largest absolute differences of the outputs and of the gradients of ``x`` and ``params``."""
    y, y_direct = layer(x), direct(x)
    probe = torch.randn_like(y)  # a random upstream gradient, so every output element matters
    grads = torch.autograd.grad(y, [x, *params], probe)
    grads_direct = torch.autograd.grad(y_direct, [x, *params], probe)
    return {
        "output": (y - y_direct).abs().max().item(),
        "input grad": (grads[0] - grads_direct[0]).abs().max().item(),
        "param grads": max((a - b).abs().max().item() for a, b in zip(grads[1:], grads_direct[1:])),
        "grad scale": max(g.abs().max().item() for g in grads_direct),
        "output scale": y_direct.abs().max().item(),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=48, help="image side in pixels")
    parser.add_argument("--quick", action="store_true", help="small tensors (smoke test)")
    args = parser.parse_args(argv)
    size = 20 if args.quick else args.size  # 2 x 20 x 20 = 800 patches: two chunks, one spanning both images
    torch.manual_seed(0)
    results = {}
    for name, check in (("involution", check_involution), ("pixel-adaptive conv", check_pac)):
        print(f"{name} ({size}x{size}, float64), chunkconv vs a direct implementation:")
        diffs = check(size)
        print("  max |difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items() if k != "output scale")
              + f"  (outputs up to {diffs['output scale']:.2f})")
        results[name] = diffs
    return results


if __name__ == "__main__":
    main()
