"""A kernel-prediction denoiser (KPN): a small CNN predicts every pixel's blur kernel.

Kernel-prediction networks (Bako et al., SIGGRAPH 2017; Mildenhall et al., CVPR 2018) do not
output pixels: a CNN looks at the noisy image and predicts, for every pixel, a k x k kernel, and
the output is that kernel applied to the noisy neighbourhood. With chunkconv that is one layer:

* five 3x3 ``nn.Conv2d`` layers turn the noisy RGB image into a feature vector per pixel (each
  sees the pixel's 11 x 11 neighbourhood);
* ``DynamicConv2d(..., kernel="shared", inputs=("features",))`` hands each pixel's feature row to
  the generator, a ``Linear`` layer whose k*k logits a softmax turns into a kernel of
  non-negative weights that sum to one (so the output is a weighted average of nearby noisy
  pixels: it cannot invent detail, and the untrained model is a Gaussian blur);
* ``kernel="shared"`` applies that one kernel to R, G and B (``kernel_groups=1``; ``3`` gives each
  channel its own) without ever forming a ``(3, 3, k, k)`` weight, and the chunks stream the
  pixels, so no ``(N, 3 * k * k, H, W)`` unfold or ``(N, k * k, H, W)`` kernel tensor exists.

The script compares four ways of denoising, on held-out images, by PSNR:

* the noisy input;
* the best fixed filter: the Gaussian or box blur (all sizes up to k x k) that does best on the
  training images;
* the *patch generator*: the previous version of this example, an MLP that sees only the noisy
  k x k patch and returns its kernel (``kernel="full"``, ``groups=3``: a ``(3, 1, k, k)`` weight
  per pixel);
* the KPN, trained on the same images for the same number of steps.

In flat regions the best kernel is a wide blur; next to an edge it must put its weight on the
pixels on the same side of the edge. A fixed filter cannot do both; both learned models can. The
patch generator is given a strong hint (its MLP sees differences to the centre pixel, scaled by
the noise level), the KPN has to find its features by itself, from a wider window, with about as many
multiply-adds per pixel (23k against 25k). Both start as the same Gaussian blur and train on the same images.

Training images are made by the script (piecewise-smooth colour images: gradients, rectangles,
discs and stripes, with Gaussian noise of sigma 0.1 on [0, 1] intensities), fresh at every step,
so there is nothing to download and nothing to overfit. PNGs go to ``--out`` if matplotlib is
installed: noisy / fixed filter / patch generator / KPN / clean, and the predicted kernels at a
few pixels on edges and in flat regions.

    python examples/denoiser.py                  # the full run (it prints how long each part took)
    python examples/denoiser.py --smoke          # seconds: a smoke test (--quick is the same)
    python examples/denoiser.py --out results/x  # where the PNGs go (default: results/denoiser)
    python examples/denoiser.py --docs-png docs/img/denoiser.png   # also the small figure of the docs
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
START_WIDTH = 1.5  # both learned models start as a Gaussian blur of this width (pixels)

# ---------------------------------------------------------------------------------------------
# Data


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
            shade = 0.3 * (rand(3, 1, 1) - 0.5) * (xs - rand(1))  # shapes are smooth, not flat, inside
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
            img = torch.where(mask, (colour + shade).clamp(0, 1), img)
        images.append(img)
    return torch.stack(images)


def noisy_pair(batch: int, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    clean = synthetic_images(batch, size, generator)
    return clean + SIGMA * torch.randn(clean.shape, generator=generator), clean


def psnr(estimate: Tensor, clean: Tensor) -> float:
    mse = (estimate.clamp(0, 1) - clean).square().mean().item()
    return 10 * math.log10(1 / mse)


# ---------------------------------------------------------------------------------------------
# The models


def _gaussian_start(linear: nn.Linear, kernel_size: int, groups: int = 1, width: float = START_WIDTH) -> None:
    """Zero weights, Gaussian logits as the bias: the untrained kernel is a Gaussian blur everywhere."""
    r = torch.arange(kernel_size) - kernel_size // 2
    logits = -(r[:, None] ** 2 + r[None, :] ** 2) / (2 * width**2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(logits.flatten().repeat(groups))


class KernelHead(nn.Module):
    """The KPN's generator: a feature row (B, F) -> softmax kernels (B, G, k, k), one per channel group."""

    def __init__(self, features: int, kernel_size: int, kernel_groups: int) -> None:
        super().__init__()
        self.kernel_size, self.kernel_groups = kernel_size, kernel_groups
        self.logits = nn.Linear(features, kernel_groups * kernel_size**2)
        _gaussian_start(self.logits, kernel_size, kernel_groups)

    def forward(self, features: Tensor) -> Tensor:
        k, g = self.kernel_size, self.kernel_groups
        return torch.softmax(self.logits(features).view(-1, g, k * k), dim=-1).view(-1, g, k, k)


class KPN(nn.Module):
    """Kernel prediction: a CNN's per-pixel features drive a ``kernel="shared"`` DynamicConv."""

    def __init__(self, kernel_size: int, width: int, kernel_groups: int = 1) -> None:
        super().__init__()
        # five 3x3 convolutions: each pixel's features see its 11 x 11 neighbourhood of the noisy image
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv2d(CHANNELS if i == 0 else width, width, 3, padding=1, padding_mode="reflect"), nn.ReLU()]
        self.predictor = nn.Sequential(*layers)
        self.filter = chunkconv.DynamicConv2d(
            KernelHead(width, kernel_size, kernel_groups), CHANNELS, CHANNELS, kernel_size,
            padding=kernel_size // 2, padding_mode="reflect", bias=False,
            kernel="shared", kernel_groups=kernel_groups, inputs=("features",),
        )  # fmt: skip

    def forward(self, noisy: Tensor) -> Tensor:
        return self.filter(noisy, features=self.predictor(noisy - 0.5))

    def kernels_at(self, noisy: Tensor, pixels: list[tuple[int, int]]) -> Tensor:
        """The kernels (pixels, G, k, k) the model applies at ``pixels`` of ``noisy`` (1, 3, H, W)."""
        features = self.predictor(noisy - 0.5)[0]
        return self.filter.generator(torch.stack([features[:, y, x] for y, x in pixels]))


class KernelPredictor(nn.Module):
    """The patch generator: one noisy k x k RGB patch -> a softmax-normalised k x k kernel, shared by R, G, B.

    Input rows are patches in ``F.unfold`` order, ``(B, 3 * k * k)``; the output is the full
    weight of a depthwise (``groups=3``) convolution, ``(B, 3, 1, k, k)``.
    """

    def __init__(self, kernel_size: int, hidden: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        taps = kernel_size * kernel_size
        self.mlp = nn.Sequential(
            nn.Linear(CHANNELS * taps, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, taps)
        )
        _gaussian_start(self.mlp[-1], kernel_size)

    def forward(self, patches: Tensor) -> Tensor:
        k = self.kernel_size
        rows = patches.view(-1, CHANNELS, k * k)
        # Features relative to the centre pixel: the kernel should depend on differences, not on
        # the absolute brightness. Scaled by 1/SIGMA so they are O(1) for noise, large at edges.
        centred = (rows - rows[:, :, k * k // 2 : k * k // 2 + 1]) / SIGMA
        kernel = torch.softmax(self.mlp(centred.flatten(1)), dim=1)  # (B, k*k), sums to 1
        return kernel.view(-1, 1, 1, k, k).expand(-1, CHANNELS, 1, k, k)


class PatchDenoiser(nn.Module):
    """The patch generator as a layer: ``kernel="full"`` with ``groups=3`` (a depthwise weight per pixel)."""

    def __init__(self, kernel_size: int, hidden: int) -> None:
        super().__init__()
        self.filter = chunkconv.DynamicConv2d(
            KernelPredictor(kernel_size, hidden), CHANNELS, CHANNELS, kernel_size, padding=kernel_size // 2,
            groups=CHANNELS, bias=False, padding_mode="reflect",
        )  # fmt: skip

    def forward(self, noisy: Tensor) -> Tensor:
        return self.filter(noisy)

    def kernels_at(self, noisy: Tensor, pixels: list[tuple[int, int]]) -> Tensor:
        k = self.filter.kernel_size[0]
        patches = F.unfold(F.pad(noisy, [k // 2] * 4, mode="reflect"), k)[0]  # (3*k*k, H*W)
        rows = torch.stack([patches[:, y * noisy.shape[-1] + x] for y, x in pixels])
        return self.filter.generator(rows)[:, :1, 0]  # (pixels, 1, k, k): R, G and B share it


def train(model: nn.Module, args: argparse.Namespace, name: str) -> tuple[list[float], float]:
    """Adam with a cosine schedule on fresh synthetic images (the same stream for every model)."""
    data = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    start, losses = time.perf_counter(), []
    report_every = max(1, args.steps // 4)
    for step in range(1, args.steps + 1):
        noisy, clean = noisy_pair(args.batch, args.size, data)
        loss = F.mse_loss(model(noisy), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % report_every == 0 or step == 1:
            recent = losses[-report_every:]
            print(f"  {name:16s} step {step:4d}  loss {sum(recent) / len(recent):.5f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    return losses, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The fixed filters


def fixed_filters(kernel_size: int, widths: list[float] | None = None) -> dict[str, Tensor]:
    """Normalised Gaussian blurs (a range of widths) and box blurs up to ``kernel_size``."""
    r = torch.arange(kernel_size) - kernel_size // 2
    filters = {}
    for width in widths or torch.linspace(0.3, kernel_size / 2, 24).tolist():
        g = torch.exp(-(r**2) / (2 * width**2))
        filters[f"Gaussian blur, sigma {width:.2f} px"] = torch.outer(g, g) / torch.outer(g, g).sum()
    for size in range(3, kernel_size + 1, 2):
        box = ((r.abs() <= size // 2)[:, None] & (r.abs() <= size // 2)[None, :]).float()
        filters[f"{size}x{size} box blur"] = box / box.sum()
    return filters


def apply_fixed(noisy: Tensor, kernel: Tensor) -> Tensor:
    k = kernel.shape[-1]
    weight = kernel.expand(CHANNELS, 1, k, k)
    return F.conv2d(F.pad(noisy, [k // 2] * 4, mode="reflect"), weight, groups=CHANNELS)


def best_fixed_filter(noisy: Tensor, clean: Tensor, kernel_size: int) -> tuple[str, Tensor]:
    """The fixed filter with the best PSNR on (noisy, clean): its name and its kernel."""
    filters = fixed_filters(kernel_size)
    name = max(filters, key=lambda n: psnr(apply_fixed(noisy, filters[n]), clean))
    return name, filters[name]


# ---------------------------------------------------------------------------------------------
# Pictures


def pick_pixels(clean: Tensor, kernel_size: int) -> list[tuple[str, int, int]]:
    """Two pixels on strong edges and two whose whole k x k window is flat, in ``clean`` (C, H, W)."""
    gy = F.pad((clean[:, 1:] - clean[:, :-1]).abs().sum(0), (0, 0, 0, 1))
    gx = F.pad((clean[:, :, 1:] - clean[:, :, :-1]).abs().sum(0), (0, 1))
    edge = gx + gy
    # the strongest change anywhere in the window the kernel covers
    window = F.max_pool2d(edge[None, None], kernel_size + 2, stride=1, padding=kernel_size // 2 + 1)[0, 0]
    margin = kernel_size
    h, w = edge.shape
    noise = torch.rand(window.shape, generator=torch.Generator().manual_seed(0))
    picks: list[tuple[str, int, int]] = []
    for label, score in (("flat", window + 1e-3 * noise), ("edge", -edge)):
        chosen: list[tuple[int, int]] = []
        for idx in score[margin : h - margin, margin : w - margin].flatten().argsort().tolist():
            y, x = divmod(idx, w - 2 * margin)
            if all(abs(y - cy) + abs(x - cx) > 3 * kernel_size for cy, cx in chosen):
                chosen.append((y, x))
            if len(chosen) == 2:
                break
        picks += [(label, y + margin, x + margin) for y, x in chosen]
    return picks


def _show(img: Tensor):
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def save_pngs(out: Path, panels: dict[str, Tensor], clean: Tensor, kernels: dict[str, Tensor], pixels) -> list[Path]:
    """Write the comparison and the kernels as PNGs; returns the paths (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    comparison = out / "denoiser_comparison.png"
    _comparison_figure(plt, panels, clean, pixels).savefig(comparison, dpi=100)
    plt.close("all")

    rows = 1 + len(kernels)
    size = (2.4 * len(pixels), 2.4 * rows)
    fig, axes = plt.subplots(rows, len(pixels), figsize=size, squeeze=False, layout="constrained")
    for col, (label, y, x) in enumerate(pixels):
        some = next(iter(kernels.values()))
        k = some.shape[-1]
        window = clean[:, y - k // 2 : y + k // 2 + 1, x - k // 2 : x + k // 2 + 1]
        axes[0, col].imshow(_show(window), interpolation="nearest")
        axes[0, col].set_title(f"{label}: clean {k}x{k}\nwindow at ({y}, {x})", fontsize=9)
        for row, (name, kernel) in enumerate(kernels.items(), start=1):
            axes[row, col].imshow(kernel[col, 0].numpy(), cmap="magma", interpolation="nearest")
            axes[row, col].set_title(f"{name} kernel", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    kernel_path = out / "denoiser_kernels.png"
    fig.savefig(kernel_path, dpi=100)
    plt.close(fig)
    return [comparison, kernel_path]


def _comparison_figure(plt, panels: dict[str, Tensor], clean: Tensor, pixels=(), scale: float = 2.6):
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(scale * (len(panels) + 1), scale * 1.2), layout="constrained")
    for ax, (title, img) in zip(axes, panels.items()):
        ax.imshow(_show(img), interpolation="nearest")
        ax.set_title(f"{title}\n{psnr(img, clean):.1f} dB", fontsize=9)
    axes[-1].imshow(_show(clean), interpolation="nearest")
    axes[-1].set_title("clean\n", fontsize=9)
    for label, y, x in pixels:
        axes[-1].plot(x, y, "o", ms=7, mfc="none", mec="red" if label == "edge" else "cyan", mew=1.5)
    for ax in axes:
        ax.axis("off")
    return fig


def save_docs_png(path: Path, panels: dict[str, Tensor], clean: Tensor) -> Path:
    """The small figure of the docs: the comparison on one crop, at a low resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    _comparison_figure(plt, panels, clean, scale=1.9).savefig(path, dpi=72)
    plt.close("all")
    return path


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps of each trained model")
    parser.add_argument("--batch", type=int, default=6, help="images per step")
    parser.add_argument("--size", type=int, default=40, help="training image side in pixels")
    parser.add_argument("--test-size", type=int, default=96, help="held-out image side in pixels")
    parser.add_argument("--kernel-size", type=int, default=9)
    parser.add_argument("--kernel-groups", type=int, default=1, choices=(1, 3), help="KPN: kernels per pixel")
    parser.add_argument("--width", type=int, default=24, help="channels of the KPN's CNN")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the patch generator's MLP")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, default=Path("results/denoiser"), help="folder for the PNGs")
    parser.add_argument("--docs-png", type=Path, help="also write the docs' small comparison figure here")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNGs")
    parser.add_argument("--smoke", "--quick", action="store_true", help="a few steps on tiny images (smoke test)")
    if parser.parse_known_args(argv)[0].smoke:  # new defaults; flags given explicitly still win
        parser.set_defaults(steps=20, batch=4, size=20, test_size=24, width=8, hidden=16, kernel_size=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    k = args.kernel_size
    models = {"patch generator": PatchDenoiser(k, args.hidden), "KPN": KPN(k, args.width, args.kernel_groups)}
    print(f"Denoising {args.size}x{args.size} synthetic images, noise sigma {SIGMA}, {k}x{k} kernels; "
          f"each model trains {args.steps} steps of {args.batch} images.")  # fmt: skip
    for name, model in models.items():
        print(f"  {name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    results: dict[str, float] = {}
    for name, model in models.items():
        losses, seconds = train(model, args, name)
        results[f"loss_first {name}"], results[f"loss_last {name}"] = losses[0], sum(losses[-10:]) / len(losses[-10:])
        results[f"seconds {name}"] = seconds

    # the fixed filter is chosen on training images, then evaluated on the held-out ones like the models
    fixed_name, fixed = best_fixed_filter(*noisy_pair(16, args.size, torch.Generator().manual_seed(99)), k)
    noisy, clean = noisy_pair(8, args.test_size, torch.Generator().manual_seed(1234))
    start = fixed_filters(k, widths=[START_WIDTH])[f"Gaussian blur, sigma {START_WIDTH:.2f} px"]
    with torch.no_grad():
        outputs = {
            "noisy input": noisy,
            f"best fixed filter ({fixed_name})": apply_fixed(noisy, fixed),
            f"either model untrained (Gaussian blur, sigma {START_WIDTH:.2f} px)": apply_fixed(noisy, start),
            **{name: model(noisy) for name, model in models.items()},
        }
    keys = ("noisy", "fixed", "untrained", "patch", "kpn")
    results.update({f"psnr_{key}": psnr(img, clean) for key, img in zip(keys, outputs.values())})
    print(f"\nHeld-out images (8 of {args.test_size}x{args.test_size}), PSNR (higher is better):")
    for name, key in zip(outputs, keys):
        trained = f"  (trained in {results[f'seconds {name}']:.0f} s)" if name in models else ""
        print(f"  {name:62s} {results[f'psnr_{key}']:6.2f} dB{trained}")

    if args.no_plots:
        return results
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed (pip install 'chunkconv[plot]'); skipping the PNGs.")
        return results
    pixels = pick_pixels(clean[0], k)
    with torch.no_grad():
        kernels = {name: model.kernels_at(noisy[:1], [(y, x) for _, y, x in pixels]) for name, model in models.items()}
    panels = {name.split(" (")[0]: img[0] for name, img in outputs.items() if not name.startswith("either")}
    for path in save_pngs(args.out, panels, clean[0], kernels, pixels):
        print(f"wrote {path}")
    if args.docs_png:
        print(f"wrote {save_docs_png(args.docs_png, panels, clean[0])}")
    return results


if __name__ == "__main__":
    main()
