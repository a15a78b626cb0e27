"""Guided depth upsampling with a pixel-adaptive convolution: a high-resolution image sharpens the edges.

A depth sensor often sees the scene at a lower resolution than the camera beside it. Upsampled
on its own (bilinear), the depth map is blurred across every object boundary. The colour image
knows where the boundaries are, so *joint* (guided) upsampling filters the upsampled depth with
weights that follow the image: a neighbour contributes only if its colour is close to the centre
pixel's (joint bilateral upsampling, Kopf et al. 2007; its learnable generalisation is the
pixel-adaptive convolution, PAC, Su et al., CVPR 2019).

With chunkconv that is one layer:

* ``kernel="modulated"``: the layer owns a static k x k ``weight`` (learned; it starts as a box),
  and the generator returns one scalar per tap and location that scales it;
* ``inputs=("guide",)``: the generator receives the guide image's k x k patches, windowed
  exactly like the depth (``guide=`` is the high-resolution colour image);
* the generator computes Gaussian affinities ``exp(-||s * (g_tap - g_centre)||^2 / 2)`` with a
  learnable scale ``s`` per colour channel and normalises them over the taps (PAC's
  ``normalize_kernel``), so the untrained layer is a joint bilateral filter (with a box as its
  spatial kernel).

The script makes synthetic scenes (a slanted background and a few nearer slanted objects; the
guide paints each object in its own colour, some with stripes that are not in the depth, plus a
little noise), downsamples the depth 4x (area average), upsamples it bilinearly, and compares on
held-out scenes, by RMSE (overall and within 2 pixels of a depth edge) and PSNR:

* bilinear upsampling;
* a plain (static) convolution that sees the upsampled depth *and* the guide as input channels,
  trained like the PAC (a residual correction of the bilinear depth);
* the PAC layer untrained (a joint bilateral filter with hand-set widths);
* the PAC layer trained briefly (120 steps by default: its spatial weight and colour scales).

A static filter cannot put a boundary where the guide says without also blurring elsewhere; the
PAC's weights change at every pixel. PNGs of the guide, the low-resolution depth, each result,
the ground truth and the error maps go to ``--out`` (if matplotlib is installed).

    python examples/guided_upsampling.py            # the full run (it prints its training times)
    python examples/guided_upsampling.py --smoke    # seconds: a smoke test (--quick is the same)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import chunkconv

# ---------------------------------------------------------------------------------------------
# Data


def scenes(batch: int, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Depth maps (N, 1, size, size) in [0, 1] and aligned RGB guides (N, 3, size, size)."""

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    depths, guides = [], []
    for _ in range(batch):
        depth = 0.8 + 0.15 * (rand(1) - 0.5) * xs + 0.15 * (rand(1) - 0.5) * ys  # a far, slanted wall
        guide = rand(3, 1, 1) * (0.7 + 0.3 * ys)
        count = 3 + int(rand(1).item() * 4)
        for z in sorted((0.1 + 0.6 * rand(count)).tolist(), reverse=True):  # far to near: near ones cover
            cy, cx, r = rand(1).item(), rand(1).item(), 0.1 + 0.25 * rand(1).item()
            kind = rand(1).item()
            if kind < 0.4:
                mask = ((ys - cy).abs() < r) & ((xs - cx).abs() < r * (0.4 + rand(1).item()))
            elif kind < 0.8:
                mask = (ys - cy) ** 2 + (xs - cx) ** 2 < r**2
            else:  # a slanted edge across the whole image
                angle = 2 * math.pi * rand(1).item()
                mask = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle) > 0
            slope = 0.1 * (rand(2) - 0.5)
            depth = torch.where(mask, z + slope[0] * (xs - cx) + slope[1] * (ys - cy), depth)
            colour = rand(3, 1, 1)
            if rand(1).item() < 0.35:  # stripes in the image that are not in the depth
                u = xs * math.cos(3 * z) + ys * math.sin(3 * z)
                colour = colour + 0.25 * (torch.sin(2 * math.pi * (6 + 10 * rand(1)) * u) > 0) - 0.125
            guide = torch.where(mask, colour.clamp(0, 1), guide)
        depths.append(depth.clamp(0, 1).unsqueeze(0))
        guides.append(guide + 0.02 * torch.randn(guide.shape, generator=generator))
    return torch.stack(depths), torch.stack(guides)


def downsample(depth: Tensor, factor: int) -> Tensor:
    """What the low-resolution sensor sees: the average depth over each factor x factor block."""
    return F.avg_pool2d(depth, factor)


def bilinear(low: Tensor, factor: int) -> Tensor:
    return F.interpolate(low, scale_factor=factor, mode="bilinear", align_corners=False)


def edge_band(depth: Tensor, width: int = 2) -> Tensor:
    """Pixels within ``width`` of a depth discontinuity (a jump above 0.03 between neighbours)."""
    jump = torch.zeros_like(depth, dtype=torch.bool)
    jump[..., 1:, :] |= (depth[..., 1:, :] - depth[..., :-1, :]).abs() > 0.03
    jump[..., :, 1:] |= (depth[..., :, 1:] - depth[..., :, :-1]).abs() > 0.03
    return F.max_pool2d(jump.float(), 2 * width + 1, stride=1, padding=width) > 0


def rmse(estimate: Tensor, truth: Tensor, where: Tensor | None = None) -> float:
    err = (estimate - truth).square()
    return (err[where] if where is not None else err).mean().sqrt().item()


def psnr(estimate: Tensor, truth: Tensor) -> float:
    return 20 * math.log10(1 / rmse(estimate.clamp(0, 1), truth))


# ---------------------------------------------------------------------------------------------
# The models


class GuideAffinity(nn.Module):
    """The PAC generator: guide patch (B, 3 * k * k) -> normalised Gaussian affinities (B, k, k).

    ``exp(-||s * (g_tap - g_centre)||^2 / 2)``, the norm over the colour channels, with a
    learnable scale ``s`` per channel (``1 / s`` is the colour difference, about, that the layer
    starts to treat as a boundary; it starts at 0.1), normalised to sum to one over the taps.
    """

    def __init__(self, guide_channels: int, kernel_size: int, colour_sigma: float = 0.1) -> None:
        super().__init__()
        self.guide_channels, self.kernel_size = guide_channels, kernel_size
        self.log_scale = nn.Parameter(torch.full((guide_channels,), -math.log(colour_sigma)))

    def forward(self, guide: Tensor) -> Tensor:
        k = self.kernel_size
        rows = guide.view(-1, self.guide_channels, k * k)
        diff = (rows - rows[:, :, k * k // 2 : k * k // 2 + 1]) * self.log_scale.exp()[:, None]
        return torch.softmax(-0.5 * diff.square().sum(1), dim=1).view(-1, k, k)


class PacUpsampler(nn.Module):
    """Bilinear upsampling, then a pixel-adaptive convolution guided by the high-resolution image."""

    def __init__(self, factor: int, kernel_size: int) -> None:
        super().__init__()
        self.factor = factor
        self.pac = chunkconv.DynamicConv2d(
            GuideAffinity(3, kernel_size), 1, 1, kernel_size, padding=kernel_size // 2, padding_mode="replicate",
            bias=False, kernel="modulated", inputs=("guide",),
        )  # fmt: skip
        nn.init.ones_(self.pac.weight)  # a box: with normalised affinities, a joint bilateral filter

    def forward(self, low: Tensor, guide: Tensor) -> Tensor:
        return self.pac(bilinear(low, self.factor), guide=guide)


class ConvUpsampler(nn.Module):
    """Bilinear upsampling plus a static convolution's correction, from the depth and the guide."""

    def __init__(self, factor: int, kernel_size: int) -> None:
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(1 + 3, 1, kernel_size, padding=kernel_size // 2, padding_mode="replicate")
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, low: Tensor, guide: Tensor) -> Tensor:
        up = bilinear(low, self.factor)
        return up + self.conv(torch.cat([up, guide], dim=1))


def train(model: nn.Module, lr: float, args: argparse.Namespace, name: str) -> float:
    """Adam with a cosine schedule on fresh synthetic scenes (the same stream for every model)."""
    data = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    start, recent = time.perf_counter(), []
    report_every = max(1, args.steps // 4)
    for step in range(1, args.steps + 1):
        depth, guide = scenes(args.batch, args.size, data)
        loss = F.mse_loss(model(downsample(depth, args.factor), guide), depth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        recent.append(loss.item())
        if step % report_every == 0 or step == 1:
            print(f"  {name:6s} step {step:4d}  RMSE {math.sqrt(sum(recent) / len(recent)):.4f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
            recent = []
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------


def save_png(path: Path, guide: Tensor, low: Tensor, results: dict[str, Tensor], truth: Tensor) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = 2 + len(results)
    fig, axes = plt.subplots(2, columns, figsize=(2.5 * columns, 5.3), layout="constrained")
    axes[0, 0].imshow(guide.clamp(0, 1).permute(1, 2, 0).numpy())
    axes[0, 0].set_title("guide (high-res image)", fontsize=9)
    axes[0, 1].imshow(low[0].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes[0, 1].set_title(f"low-res depth ({low.shape[-1]}x{low.shape[-2]})", fontsize=9)
    axes[1, 0].imshow(truth[0].numpy(), cmap="viridis", vmin=0, vmax=1)
    axes[1, 0].set_title("ground truth", fontsize=9)
    axes[1, 1].axis("off")
    for col, (name, depth) in enumerate(results.items(), start=2):
        axes[0, col].imshow(depth[0].numpy(), cmap="viridis", vmin=0, vmax=1)
        axes[0, col].set_title(f"{name}\nRMSE {rmse(depth, truth):.4f}", fontsize=9)
        axes[1, col].imshow((depth - truth)[0].abs().numpy(), cmap="magma", vmin=0, vmax=0.15)
        axes[1, col].set_title("|error|", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="training steps of each trained model")
    parser.add_argument("--batch", type=int, default=4, help="scenes per step")
    parser.add_argument("--size", type=int, default=64, help="training depth side (high resolution), pixels")
    parser.add_argument("--test-size", type=int, default=128, help="held-out depth side, pixels")
    parser.add_argument("--factor", type=int, default=4, help="upsampling factor")
    parser.add_argument("--kernel-size", type=int, default=9)
    parser.add_argument("--lr-pac", type=float, default=2e-2, help="Adam's learning rate for the PAC")
    parser.add_argument("--lr-conv", type=float, default=2e-3, help="Adam's learning rate for the plain conv")
    parser.add_argument("--out", type=Path, default=Path("results/guided_upsampling"), help="folder for the PNG")
    parser.add_argument("--no-plots", action="store_true", help="do not write the PNG")
    parser.add_argument("--smoke", "--quick", action="store_true", help="a few steps on small scenes (smoke test)")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(steps=15, size=32, test_size=48, kernel_size=7)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    k, factor = args.kernel_size, args.factor
    print(f"Upsampling depth {factor}x with a {k}x{k} pixel-adaptive convolution guided by the RGB image; "
          f"training on {args.batch} scenes of {args.size}x{args.size} per step, {args.steps} steps.")  # fmt: skip
    untrained = PacUpsampler(factor, k)
    models = {"conv": ConvUpsampler(factor, k), "PAC": PacUpsampler(factor, k)}
    rates = {"conv": args.lr_conv, "PAC": args.lr_pac}
    seconds = {name: train(model, rates[name], args, name) for name, model in models.items()}

    depth, guide = scenes(6, args.test_size, torch.Generator().manual_seed(1234))
    low = downsample(depth, factor)
    with torch.no_grad():
        outputs = {  # key: (label, upsampled depth, seconds of training)
            "bilinear": ("bilinear", bilinear(low, factor), None),
            "conv": ("plain conv (depth + guide channels), trained", models["conv"](low, guide), seconds["conv"]),
            "pac_untrained": ("PAC untrained (joint bilateral filter)", untrained(low, guide), None),
            "pac": ("PAC trained", models["PAC"](low, guide), seconds["PAC"]),
        }
    band = edge_band(depth)
    results: dict[str, float] = {}
    print(f"\nHeld-out scenes (6 of {args.test_size}x{args.test_size}; {band.float().mean():.0%} of the pixels "
          "lie within 2 px of a depth edge):")  # fmt: skip
    print(f"  {'':46s} {'RMSE':>7s} {'at edges':>9s} {'PSNR':>9s}")
    for key, (label, estimate, trained) in outputs.items():
        results[f"rmse_{key}"] = rmse(estimate, depth)
        results[f"edge_rmse_{key}"] = rmse(estimate, depth, band)
        results[f"psnr_{key}"] = psnr(estimate, depth)
        took = f"  (trained in {trained:.0f} s)" if trained is not None else ""
        print(f"  {label:46s} {results[f'rmse_{key}']:7.4f} {results[f'edge_rmse_{key}']:9.4f} "
              f"{results[f'psnr_{key}']:6.2f} dB{took}")  # fmt: skip
    affinity = models["PAC"].pac.generator
    widths = ", ".join(f"{w:.3f}" for w in (-affinity.log_scale).exp().tolist())
    print(f"  learned colour widths of the PAC (R, G, B; started at 0.1): {widths}")

    i = shown_scene({key: estimate for key, (_, estimate, _) in outputs.items()}, depth)
    for key, (_, estimate, _) in outputs.items():
        results[f"shown_rmse_{key}"] = rmse(estimate[i : i + 1], depth[i : i + 1])
    print(f"the figure shows held-out scene {i + 1} of 6: the first whose methods rank by RMSE as on all six")
    if args.no_plots:
        return results
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed (pip install 'chunkconv[plot]'); skipping the PNG.")
        return results
    shown = {label.split(" (")[0].replace(", trained", ""): img[i] for label, img, _ in outputs.values()}
    print(f"wrote {save_png(args.out / 'guided_upsampling.png', guide[i], low[i], shown, depth[i])}")
    return results


def shown_scene(estimates: dict[str, Tensor], depth: Tensor) -> int:
    """The scene to show: the first whose methods rank by RMSE as they do over all the scenes
    (a representative one, so the figure shows what the table says); else the first.
    """
    overall = sorted(estimates, key=lambda k: rmse(estimates[k], depth))
    for i in range(depth.shape[0]):
        ranked = sorted(estimates, key=lambda k: rmse(estimates[k][i : i + 1], depth[i : i + 1]))
        if ranked == overall:
            return i
    return 0


if __name__ == "__main__":
    main()
