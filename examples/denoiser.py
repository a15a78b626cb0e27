"""A kernel-prediction denoiser: a DynamicConv whose generator predicts each pixel's blur kernel.

Kernel-prediction denoisers (Bako et al., SIGGRAPH 2017; Mildenhall et al., CVPR 2018) do not
output pixels: they predict, for every pixel, a small kernel and output the kernel applied to
the noisy neighbourhood. That is a dynamic convolution, and chunkconv's generator contract is
exactly "patch -> that patch's kernel", so the whole model is one ``DynamicConv``:

* the generator is an MLP that sees one k x k patch of the noisy RGB image (nothing else);
* it outputs k*k logits, and a softmax turns them into a kernel of non-negative weights that sum
  to one, so the output is always a weighted average of nearby noisy pixels (it cannot invent
  detail, and at initialisation it is already a plain blur, which makes it train fast);
* the same kernel is applied to the three colour channels (``groups=3``: weight ``(3, 1, k, k)``).

In flat regions the best kernel is a wide blur; next to an edge it must put its weight on the
pixels on the same side of the edge. A fixed kernel cannot do both; the script measures that by
comparing with the best fixed Gaussian blur.

Training images are made by the script (gradients, rectangles, discs, stripes; Gaussian noise
with sigma 0.1 on [0, 1] intensities), fresh each step, so there is nothing to download and
nothing to overfit. The script prints the loss as it falls and the PSNR of noisy input, best
fixed blur and denoiser on held-out images, then saves PNGs (noisy / denoised / clean and the
predicted kernels at a few pixels, on edges and in flat regions) if matplotlib is installed.

    python examples/denoiser.py                # ~30 s to 2 min on 2 CPU cores
    python examples/denoiser.py --quick        # seconds: a smoke test
    python examples/denoiser.py --out results  # where the PNGs go (default: denoiser_output)
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

CHANNELS = 3
SIGMA = 0.1


def synthetic_images(batch: int, size: int, generator: torch.Generator) -> Tensor:
    """Piecewise-smooth RGB images in [0, 1]: a colour gradient with rectangles, discs and stripes."""

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(batch):
        a, b, c = rand(3, 1, 1), rand(3, 1, 1), rand(3, 1, 1)
        img = 0.5 * (a + (b - a) * xs + (c - a) * ys)  # smooth background, dim enough for bright shapes
        for _ in range(int(rand(1).item() * 4) + 2):
            colour = rand(3, 1, 1)
            kind = rand(1).item()
            cy, cx, r = rand(1).item(), rand(1).item(), 0.08 + 0.25 * rand(1).item()
            if kind < 0.4:
                mask = ((ys - cy).abs() < r) & ((xs - cx).abs() < r * (0.5 + rand(1).item()))
            elif kind < 0.8:
                mask = (ys - cy) ** 2 + (xs - cx) ** 2 < r**2
            else:  # a band of stripes
                angle = math.pi * rand(1).item()
                u = xs * math.cos(angle) + ys * math.sin(angle)
                mask = ((u * (4 + 8 * rand(1).item())) % 1 < 0.5) & ((ys - cy).abs() < r) & ((xs - cx).abs() < r)
            img = torch.where(mask, colour, img)
        images.append(img)
    return torch.stack(images)


class KernelPredictor(nn.Module):
    """The generator: one noisy k x k RGB patch -> a softmax-normalised k x k kernel, shared by R, G, B.

    Input rows are patches in ``F.unfold`` order, ``(B, 3 * k * k)``; the output is the weight of a
    depthwise convolution, ``(B, 3, 1, k, k)``.
    """

    def __init__(self, kernel_size: int, hidden: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        taps = kernel_size * kernel_size
        self.mlp = nn.Sequential(
            nn.Linear(CHANNELS * taps, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, taps),
        )
        # Start as a uniform blur: zero logits give equal weights everywhere.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, patches: Tensor) -> Tensor:
        k = self.kernel_size
        rows = patches.view(-1, CHANNELS, k * k)
        # Features relative to the centre pixel: the kernel should depend on differences, not on
        # the absolute brightness. Scaled by 1/SIGMA so they are O(1) for noise, large at edges.
        centred = (rows - rows[:, :, k * k // 2 : k * k // 2 + 1]) / SIGMA
        kernel = torch.softmax(self.mlp(centred.flatten(1)), dim=1)  # (B, k*k), sums to 1
        return kernel.view(-1, 1, 1, k, k).expand(-1, CHANNELS, 1, k, k)


def psnr(estimate: Tensor, clean: Tensor) -> float:
    mse = (estimate.clamp(0, 1) - clean).square().mean().item()
    return 10 * math.log10(1 / mse)


def best_fixed_blur(noisy: Tensor, clean: Tensor, kernel_size: int) -> tuple[float, float]:
    """The PSNR of the best Gaussian blur of the same size (searched over its width), and that width."""
    best = (-math.inf, 0.0)
    r = torch.arange(kernel_size) - kernel_size // 2
    for width in torch.linspace(0.3, kernel_size / 2, 24).tolist():
        g = torch.exp(-(r**2) / (2 * width**2))
        k2 = torch.outer(g, g)
        k2 = (k2 / k2.sum()).expand(CHANNELS, 1, kernel_size, kernel_size)
        blurred = F.conv2d(F.pad(noisy, [kernel_size // 2] * 4, mode="reflect"), k2, groups=CHANNELS)
        best = max(best, (psnr(blurred, clean), width))
    return best


def pick_pixels(clean: Tensor, kernel_size: int) -> list[tuple[str, int, int]]:
    """Two pixels on strong edges and two whose whole k x k window is flat, in ``clean`` (C, H, W)."""
    gy = F.pad((clean[:, 1:] - clean[:, :-1]).abs().sum(0), (0, 0, 0, 1))
    gx = F.pad((clean[:, :, 1:] - clean[:, :, :-1]).abs().sum(0), (0, 1))
    edge = gx + gy
    # the strongest change anywhere in the window the kernel covers
    window = F.max_pool2d(edge[None, None], kernel_size + 2, stride=1, padding=kernel_size // 2 + 1)[0, 0]
    margin = kernel_size
    h, w = edge.shape
    picks: list[tuple[str, int, int]] = []
    for label, score in (("flat", window + 1e-3 * torch.rand(window.shape)), ("edge", -edge)):
        chosen: list[tuple[int, int]] = []
        for idx in score[margin : h - margin, margin : w - margin].flatten().argsort().tolist():
            y, x = divmod(idx, w - 2 * margin)
            if all(abs(y - cy) + abs(x - cx) > 3 * kernel_size for cy, cx in chosen):
                chosen.append((y, x))
            if len(chosen) == 2:
                break
        picks += [(label, y + margin, x + margin) for y, x in chosen]
    return picks


def save_pngs(out: Path, noisy: Tensor, denoised: Tensor, clean: Tensor, kernels, pixels) -> list[Path]:
    """Write the comparison and the kernels as PNGs; returns the paths (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)

    def show(img: Tensor):
        return img.clamp(0, 1).permute(1, 2, 0).numpy()

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    for ax, img, title in zip(
        axes,
        (noisy, denoised, clean),
        (f"noisy ({psnr(noisy, clean):.1f} dB)", f"denoised ({psnr(denoised, clean):.1f} dB)", "clean"),
    ):
        ax.imshow(show(img), interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    for label, y, x in pixels:
        axes[2].plot(x, y, "o", ms=8, mfc="none", mec="red" if label == "edge" else "cyan", mew=2)
    fig.tight_layout()
    comparison = out / "denoiser_comparison.png"
    fig.savefig(comparison, dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(pixels), figsize=(2.6 * len(pixels), 5.4))
    k = kernels.shape[-1]
    for col, ((label, y, x), kernel) in enumerate(zip(pixels, kernels)):
        window = clean[:, y - k // 2 : y + k // 2 + 1, x - k // 2 : x + k // 2 + 1]
        axes[0, col].imshow(show(window), interpolation="nearest")
        axes[0, col].set_title(f"{label}: clean {k}x{k} window\nat ({y}, {x})", fontsize=10)
        axes[1, col].imshow(kernel.numpy(), cmap="magma", interpolation="nearest")
        axes[1, col].set_title("predicted kernel", fontsize=10)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    kernel_path = out / "denoiser_kernels.png"
    fig.savefig(kernel_path, dpi=100)
    plt.close(fig)
    return [comparison, kernel_path]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--size", type=int, default=48, help="training image side in pixels")
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("denoiser_output"), help="folder for the PNGs")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNGs")
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny images (smoke test)")
    if parser.parse_known_args(argv)[0].quick:  # new defaults; flags given explicitly still win
        parser.set_defaults(steps=30, batch=4, size=24, hidden=32)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)
    k = args.kernel_size
    model = chunkconv.DynamicConv(
        KernelPredictor(k, args.hidden), CHANNELS, CHANNELS, kernel_size=k, padding=k // 2,
        groups=CHANNELS, bias=False, padding_mode="reflect",
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    params = sum(p.numel() for p in model.parameters())
    print(f"Model: {model}\n{params:,} parameters; training {args.steps} steps of {args.batch} "
          f"{args.size}x{args.size} images, noise sigma {SIGMA}")

    start = time.perf_counter()
    losses = []
    report_every = max(1, args.steps // 10)
    for step in range(1, args.steps + 1):
        clean = synthetic_images(args.batch, args.size, data)
        noisy = clean + SIGMA * torch.randn(clean.shape, generator=data)
        loss = F.mse_loss(model(noisy), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % report_every == 0 or step == 1:
            recent = sum(losses[-report_every:]) / len(losses[-report_every:])
            print(f"step {step:4d}  loss {recent:.5f}  ({time.perf_counter() - start:.0f} s)")

    test_gen = torch.Generator().manual_seed(1234)
    test_size = max(args.size, 64) if not args.quick else args.size
    clean = synthetic_images(4, test_size, test_gen)
    noisy = clean + SIGMA * torch.randn(clean.shape, generator=test_gen)
    with torch.no_grad():
        denoised = model(noisy)
    results = {
        "loss_first": losses[0],
        "loss_last": sum(losses[-report_every:]) / len(losses[-report_every:]),
        "psnr_noisy": psnr(noisy, clean),
        "psnr_denoised": psnr(denoised, clean),
    }
    results["psnr_blur"], width = best_fixed_blur(noisy, clean, k)
    print(f"\nHeld-out {test_size}x{test_size} images, PSNR (higher is better):")
    print(f"  noisy input                     {results['psnr_noisy']:6.2f} dB")
    print(f"  best fixed {k}x{k} Gaussian blur   {results['psnr_blur']:6.2f} dB  (sigma {width:.2f} px)")
    print(f"  kernel-prediction denoiser      {results['psnr_denoised']:6.2f} dB")

    if args.no_plots:
        return results
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed (pip install 'chunkconv[plot]'); skipping the PNGs.")
        return results
    pixels = pick_pixels(clean[0], k)
    patches = F.unfold(F.pad(noisy[:1], [k // 2] * 4, mode="reflect"), k)[0]  # (3*k*k, H*W)
    rows = torch.stack([patches[:, y * test_size + x] for _, y, x in pixels])
    with torch.no_grad():
        kernels = model.generator(rows)[:, 0, 0]  # (pixels, k, k): the kernel at each chosen pixel
    for path in save_pngs(args.out, noisy[0], denoised[0], clean[0], kernels, pixels):
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
