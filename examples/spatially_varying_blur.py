"""A spatially varying lens blur: the point-spread function (PSF) is a function of the position.

A real lens is sharpest in the middle of the frame: towards the corners its PSF widens and
stretches along the radius, and differently for each colour (lateral chromatic blur). A blur
whose kernel depends on where it is applied is a dynamic convolution whose generator reads the
*position* rather than the pixels:

* ``inputs=("positions",)``: the generator receives each output pixel's window centre, a row
  ``(row, column)`` in ``[-1, 1]`` (``grid_sample``'s convention with ``align_corners=False``:
  -1 and 1 are the outer edges of the image; for 2-D the row, H, comes first);
* ``kernel="shared"`` with ``kernel_groups=3``: it returns one k x k kernel per colour, applied
  depthwise, channel ``c`` with the kernel of group ``c // (channels / 3)``.

The script

1. defines a lens-like PSF (``LensPSF``: an anisotropic Gaussian whose radial and tangential
   widths grow with the squared distance from the centre, the radial one faster and the faster
   the redder) and blurs a test chart with it; on a large chart this is the forward model that
   needs chunking (the unfold alone would need ``H * W * 3 * k * k`` numbers), and the script
   prints chunkconv's plan and the measured peak memory;
2. fits an MLP of the position (``PSFNet``: ``(row, column) -> 3 softmax kernels``) to (sharp,
   blurred + noise) image pairs, and compares it with the best single (spatially invariant)
   PSF fitted the same way: the error of the PSF itself over the field, and the PSNR of
   re-blurring held-out images. (Within half a kernel of the border the padding mirrors the
   image, so there a PSF cannot be told from its mirror image: the fit is judged, and its PSFs
   shown, where the window lies inside the fitting images.)
3. saves PNGs (sharp and blurred chart, crops at the centre and in a corner, the true and fitted
   PSFs at a 3 x 3 grid of positions) to ``--out`` if matplotlib is installed.

The blur here is the *gather* model: each output pixel averages its neighbourhood with the PSF
of its own position (for a slowly varying PSF the usual approximation of the *scatter* model, in
which each source point spreads with its own PSF). The Gaussians are centrosymmetric, so
correlation (what a convolution layer computes) and convolution agree.

    python examples/spatially_varying_blur.py            # 1-2 min on 2 CPU cores
    python examples/spatially_varying_blur.py --smoke    # seconds: a smoke test (--quick is the same)
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
NOISE = 0.01

# ---------------------------------------------------------------------------------------------
# The lens


def tap_offsets(kernel_size: int) -> tuple[Tensor, Tensor]:
    """Each tap's offset from the window centre in pixels, rows and columns, flattened row-major."""
    r = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return dy.reshape(-1), dx.reshape(-1)


class LensPSF(nn.Module):
    """The true PSF: positions (B, 2) in [-1, 1] -> one normalised k x k Gaussian per colour, (B, 3, k, k).

    Widths in pixels, at squared radius ``r2 = row**2 + column**2`` (2 in the corners):
    ``radial = sharp + radial_growth[colour] * r2`` along the line to the centre and
    ``tangential = sharp + tangential_growth * r2`` across it.
    """

    def __init__(self, kernel_size: int, sharp: float = 0.6, radial_growth=(1.2, 1.0, 0.8), tangential_growth=0.4):
        super().__init__()
        self.kernel_size = kernel_size
        self.sharp, self.tangential_growth = sharp, tangential_growth
        self.register_buffer("radial_growth", torch.tensor(radial_growth), persistent=False)
        dy, dx = tap_offsets(kernel_size)
        self.register_buffer("dy", dy, persistent=False)
        self.register_buffer("dx", dx, persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        k = self.kernel_size
        r2 = positions.square().sum(1, keepdim=True)  # (B, 1)
        r = r2.sqrt()
        # the direction away from the centre (at the centre itself, where the PSF is round, any)
        unit = torch.where(r > 1e-6, positions / r.clamp_min(1e-6), torch.tensor([1.0, 0.0], dtype=positions.dtype))
        along = unit[:, :1] * self.dy + unit[:, 1:] * self.dx  # (B, taps): offset along the radius
        across = unit[:, :1] * self.dx - unit[:, 1:] * self.dy
        radial = (self.sharp + self.radial_growth.to(positions.dtype) * r2)[:, :, None]  # (B, 3, 1)
        tangential = (self.sharp + self.tangential_growth * r2)[:, :, None]  # (B, 1, 1)
        logits = -0.5 * ((along[:, None] / radial) ** 2 + (across[:, None] / tangential) ** 2)  # (B, 3, taps)
        return torch.softmax(logits, dim=-1).view(-1, CHANNELS, k, k)


class PSFNet(nn.Module):
    """The fitted PSF: an MLP of the position -> one softmax-normalised k x k kernel per colour, (B, 3, k, k).

    The MLP reads the position and its second-order terms (row**2, column**2, row * column), as a
    lens's aberrations are polynomials in the field position; it knows nothing else about lenses.
    """

    def __init__(self, kernel_size: int, hidden: int = 48) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        taps = kernel_size * kernel_size
        self.mlp = nn.Sequential(
            nn.Linear(5, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, CHANNELS * taps)
        )
        nn.init.zeros_(self.mlp[-1].weight)  # start everywhere as the same small Gaussian, sigma 1 px
        dy, dx = tap_offsets(kernel_size)
        with torch.no_grad():
            self.mlp[-1].bias.copy_((-0.5 * (dy**2 + dx**2)).repeat(CHANNELS))

    def forward(self, positions: Tensor) -> Tensor:
        k = self.kernel_size
        row, col = positions[:, :1], positions[:, 1:]
        terms = torch.cat([row, col, row * row, col * col, row * col], dim=1)
        logits = self.mlp(terms).view(-1, CHANNELS, k * k)
        return torch.softmax(logits, dim=-1).view(-1, CHANNELS, k, k)


def lens_blur(psf: nn.Module, kernel_size: int, budget="auto") -> chunkconv.DynamicConv2d:
    """The blur layer: each pixel filtered with the PSF of its position, one kernel per colour."""
    return chunkconv.DynamicConv2d(
        psf, CHANNELS, CHANNELS, kernel_size, padding=kernel_size // 2, padding_mode="reflect", bias=False,
        kernel="shared", kernel_groups=CHANNELS, inputs=("positions",), budget=budget,
    )  # fmt: skip


def blur_stacked(blur: chunkconv.DynamicConv2d, images: Tensor) -> Tensor:
    """Blur ``images`` (N, 3, H, W) running the PSF generator once per pixel, not once per pixel and image.

    The PSF depends on the position only, so the N images are stacked along the channels,
    colour-major (R of every image, then G, then B): with ``kernel_groups=3`` consecutive
    channels share a group, so the first N channels use the red kernel, the next N the green one.
    """
    n, c, h, w = images.shape
    stacked = images.transpose(0, 1).reshape(1, c * n, h, w)
    layer = chunkconv.DynamicConv2d(
        blur.generator, c * n, c * n, blur.kernel_size, padding=blur.padding, padding_mode=blur.padding_mode,
        bias=False, kernel="shared", kernel_groups=CHANNELS, inputs=("positions",), budget=blur.budget,
    )  # fmt: skip
    return layer(stacked).reshape(c, n, h, w).transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Images


def chart(size: int) -> Tensor:
    """A test chart (1, 3, size, size): a grid of bright points over stripes, rings and squares."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = (ys**2 + xs**2).sqrt()
    base = 0.25 + 0.15 * ((torch.atan2(ys, xs) * 12 / math.pi).floor() % 2)  # a Siemens star
    base = base + 0.2 * ((r * 10).floor() % 2) * (r > 0.85)  # rings near the corners
    spacing = max(8, size // 24)
    grid = torch.zeros(size, size)
    grid[spacing // 2 :: spacing, spacing // 2 :: spacing] = 1.0  # point sources: the PSF, visible
    image = torch.stack([base * 0.9, base, base * 1.1]).clamp(0, 1)
    return torch.where(grid > 0, grid, image).unsqueeze(0)


def random_images(batch: int, size: int, generator: torch.Generator) -> Tensor:
    """Training images: random rectangles and discs, scattered bright points and a fine random texture.

    The texture has detail at every frequency, so every part of every PSF shows in the blur.
    """

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(batch):
        img = 0.2 * rand(3, 1, 1).expand(3, size, size)
        for _ in range(6):
            cy, cx, r = 2 * rand(1) - 1, 2 * rand(1) - 1, 0.1 + 0.3 * rand(1)
            square = (ys - cy).abs().maximum((xs - cx).abs()) < r
            mask = square if rand(1) < 0.5 else (ys - cy) ** 2 + (xs - cx) ** 2 < r**2
            img = torch.where(mask, rand(3, 1, 1), img)
        img = 0.6 * img + 0.4 * rand(3, size, size)
        points = rand(size, size) < 0.01
        images.append(torch.where(points, torch.ones(()), img))
    return torch.stack(images)


def psnr(estimate: Tensor, truth: Tensor) -> float:
    return 10 * math.log10(1 / (estimate - truth).square().mean().item())


def field_positions(count: int, extent: float) -> Tensor:
    """A count x count grid of positions over the field, (count**2, 2), from -extent to extent."""
    axis = torch.linspace(-extent, extent, count)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)
    return grid.reshape(-1, 2)


def observable_extent(size: int, kernel_size: int) -> float:
    """How far out the PSF can be told from its mirror image when fitted on ``size`` x ``size`` images.

    Where the window reaches into the (reflect) padding, the image is locally mirror-symmetric,
    so a PSF and its reflection blur it alike; the fit is judged where the window is inside.
    """
    return 1 - kernel_size / size


def psf_error(fitted: nn.Module, true: nn.Module, extent: float) -> float:
    """Mean total-variation distance between fitted and true PSFs over the field (0: equal, 1: disjoint)."""
    pos = field_positions(9, extent)
    with torch.no_grad():
        return 0.5 * (fitted(pos) - true(pos)).abs().sum((-1, -2)).mean().item()


# ---------------------------------------------------------------------------------------------


class InvariantPSF(nn.Module):
    """The baseline: one PSF per colour for the whole field (a plain depthwise convolution)."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        dy, dx = tap_offsets(kernel_size)
        self.kernel_size = kernel_size
        self.logits = nn.Parameter((-0.5 * (dy**2 + dx**2)).repeat(CHANNELS, 1))  # sigma 1 px, like PSFNet

    def forward(self, positions: Tensor) -> Tensor:
        k = self.kernel_size
        kernel = torch.softmax(self.logits, dim=-1).view(1, CHANNELS, k, k)
        return kernel.expand(len(positions), CHANNELS, k, k)

    def blur(self, images: Tensor) -> Tensor:
        k = self.kernel_size
        weight = torch.softmax(self.logits, dim=-1).view(CHANNELS, 1, k, k)
        return F.conv2d(F.pad(images, [k // 2] * 4, mode="reflect"), weight, groups=CHANNELS)


def blur_with(psf: nn.Module, kernel_size: int):
    """A function that blurs images with ``psf`` (through chunkconv unless the PSF is invariant)."""
    if isinstance(psf, InvariantPSF):
        return psf.blur
    layer = lens_blur(psf, kernel_size)
    return lambda images: blur_stacked(layer, images)


def fit(psf: nn.Module, true_psf: nn.Module, args: argparse.Namespace, name: str) -> float:
    """Fit ``psf`` to (sharp, truly blurred + noise) pairs by Adam on the mean squared error."""
    data = torch.Generator().manual_seed(0)
    true_blur, model_blur = blur_with(true_psf, args.kernel_size), blur_with(psf, args.kernel_size)
    optimizer = torch.optim.Adam(psf.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    start = time.perf_counter()
    report_every = max(1, args.steps // 4)
    for step in range(1, args.steps + 1):
        sharp = random_images(args.batch, args.size, data)
        with torch.no_grad():
            observed = true_blur(sharp)
        observed = observed + NOISE * torch.randn(observed.shape, generator=data)
        loss = F.mse_loss(model_blur(sharp), observed)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % report_every == 0 or step == 1:
            error = psf_error(psf, true_psf, args.extent)
            print(f"  {name:23s} step {step:4d}  loss {loss.item():.6f}  PSF error {error:.3f}"
                  f"  ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Pictures


def _rgb(img: Tensor):
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def _psf_rgb(kernel: Tensor):
    """A (3, k, k) PSF shown as an RGB image, each colour scaled to its own peak."""
    return _rgb(kernel / kernel.amax((-1, -2), keepdim=True))


def save_pngs(out: Path, sharp: Tensor, blurred: Tensor, psfs: dict[str, nn.Module], extent: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    size = sharp.shape[-1]
    crop = size // 8
    middle = slice((size - crop) // 2, (size + crop) // 2)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), layout="constrained")
    for ax, img, title in (
        (axes[0], sharp, "sharp chart"),
        (axes[1], blurred, "blurred by the lens model"),
        (axes[2], blurred[:, middle, middle], "centre (zoomed)"),
        (axes[3], blurred[:, :crop, :crop], "top-left corner (zoomed)"),
    ):  # fmt: skip
        ax.imshow(_rgb(img), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    charts = out / "spatially_varying_blur.png"
    fig.savefig(charts, dpi=90)
    plt.close(fig)

    positions = field_positions(3, extent)
    fig, axes = plt.subplots(3, 3 * len(psfs), figsize=(2.0 * 3 * len(psfs), 6.4), layout="constrained")
    with torch.no_grad():
        for block, (name, psf) in enumerate(psfs.items()):
            kernels = psf(positions)
            for i, (kernel, pos) in enumerate(zip(kernels, positions.tolist())):
                ax = axes[i // 3, 3 * block + i % 3]
                ax.imshow(_psf_rgb(kernel), interpolation="nearest")
                ax.set_title(f"{name}\n({pos[0]:+.1f}, {pos[1]:+.1f})", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    grid = out / "spatially_varying_blur_psfs.png"
    fig.savefig(grid, dpi=90)
    plt.close(fig)
    return [charts, grid]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chart-size", type=int, default=512, help="side of the chart the lens model blurs")
    parser.add_argument("--budget", default="64MB", help="memory budget of that blur")
    parser.add_argument("--kernel-size", type=int, default=15)
    parser.add_argument("--steps", type=int, default=120, help="fitting steps of each fitted PSF")
    parser.add_argument("--batch", type=int, default=4, help="image pairs per step")
    parser.add_argument("--size", type=int, default=64, help="side of the fitting images")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, default=Path("results/spatially_varying_blur"), help="folder for the PNGs")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNGs")
    parser.add_argument("--smoke", "--quick", action="store_true", help="small sizes, a few steps (smoke test)")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(chart_size=64, budget="1MB", kernel_size=9, steps=12, batch=2, size=32)
    args = parser.parse_args(argv)
    args.extent = observable_extent(args.size, args.kernel_size)
    torch.manual_seed(0)
    k, results = args.kernel_size, {}

    # 1. the forward model on a chart
    true_psf = LensPSF(k)
    blur = lens_blur(true_psf, k, budget=args.budget)
    sharp = chart(args.chart_size)
    side = f"{args.chart_size}x{args.chart_size}"
    print(f"1. Blurring a {side} chart with the lens model ({k}x{k} PSFs, one per colour):")
    print("\n".join("   " + line for line in str(blur.plan(sharp)).splitlines()))
    start = time.perf_counter()
    with torch.no_grad(), chunkconv.MemoryTracker() as tracker:
        blurred = blur(sharp)
    results["blur_seconds"], results["blur_peak"] = time.perf_counter() - start, tracker.peak
    results["unfold_bytes"] = args.chart_size**2 * CHANNELS * k * k * 4
    print(f"   took {results['blur_seconds']:.1f} s; measured peak {tracker.peak / 2**20:.1f} MiB "
          f"(the unfold alone would be {results['unfold_bytes'] / 2**20:.0f} MiB)")  # fmt: skip

    # 2. fitting a PSF generator to (sharp, blurred) pairs
    pairs = f"{args.batch} (sharp, blurred + noise {NOISE}) pairs of {args.size}x{args.size}"
    print(f"\n2. Fitting PSFs to {pairs} per step:")
    fitted = {"MLP of the position": PSFNet(k), "spatially invariant PSF": InvariantPSF(k)}
    seconds = {name: fit(psf, true_psf, args, name) for name, psf in fitted.items()}
    held_out = random_images(4, args.size, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        truth = blur_with(true_psf, k)(held_out)
        reblurred = {name: blur_with(psf, k)(held_out) for name, psf in fitted.items()}
    print(f"\n   Held-out images (4 of {args.size}x{args.size}):")
    print(f"   {'':26s} {'PSF error':>9s} {'re-blur PSNR':>13s}")
    for (name, psf), key in zip(fitted.items(), ("mlp", "invariant")):
        results[f"psf_error_{key}"] = psf_error(psf, true_psf, args.extent)
        results[f"psnr_{key}"] = psnr(reblurred[name], truth)
        print(f"   {name:26s} {results[f'psf_error_{key}']:9.3f} {results[f'psnr_{key}']:10.2f} dB"
              f"  (fitted in {seconds[name]:.0f} s)")  # fmt: skip
    print(
        f"   (PSF error: the mean total-variation distance to the true PSF, 0 = equal, 1 = disjoint, over a "
        f"9 x 9 grid of positions up to {args.extent:.2f}, where the fitting images' windows lie inside them; "
        "re-blur PSNR: the fitted blur of held-out images against the true one)"
    )

    if args.no_plots:
        return results
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed (pip install 'chunkconv[plot]'); skipping the PNGs.")
        return results
    psfs = {"true": true_psf, "fitted MLP": fitted["MLP of the position"]}
    for path in save_pngs(args.out, sharp[0], blurred[0], psfs, args.extent):
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
