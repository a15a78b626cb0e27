"""A whole-slide image that does not fit in a worker's memory, denoised tile by tile, exactly.

Whole-slide pathology scans are 100k x 100k RGB images stored in chunks (Zarr, OME-Zarr, TIFF).
This script makes a synthetic one chunk by chunk into a Zarr store on disk (by default 16k x 16k
RGB: 768 MiB as uint8, 3 GiB as the float32 the model reads, against workers capped at 1 GiB
each), and runs a kernel-prediction denoiser with a chunkconv layer over it on a 2-worker
``distributed.LocalCluster`` with ``chunkconv.tiled``: each task reads one chunk and the halo
around it, and keeps the outputs it owns, so the result is the in-memory model's, seamless, for
any chunking. The output goes to another Zarr store, as uint8, as a user would store it.

The model is ``examples/denoiser.py``'s KPN (a small CNN predicts each pixel's k x k kernel;
``DynamicConv2d(kernel="shared", inputs=("features",))`` applies it), trained for a few seconds
on synthetic crops. Its ``forward`` computes the features from the input itself, which
chunkconv cannot read, so its geometry is declared: ``halo=5`` (the CNN sees 11 x 11 pixels,
the kernel 7 x 7).

It prints the throughput (megapixels per second), each worker's peak memory, and the largest
difference from the in-memory model on two crops (a corner, with the real border, and the
centre); it saves a thumbnail of input and output and a crop at full resolution.

    python examples/whole_slide.py                   # 16k x 16k: a few minutes on 2 idle cores
    python examples/whole_slide.py --size 4096       # a smaller slide
    python examples/whole_slide.py --smoke           # seconds: a 512 x 512 slide, for the tests
    python examples/whole_slide.py --docs-png docs/img/whole_slide.png   # also the docs' figure
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import chunkconv

CHANNELS = 3
SIGMA = 0.1


class KernelHead(nn.Module):
    """A feature row (B, F) -> one softmax k x k kernel per pixel, shared by R, G and B."""

    def __init__(self, features: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.logits = nn.Linear(features, kernel_size**2)
        r = torch.arange(kernel_size) - kernel_size // 2
        with torch.no_grad():  # the untrained model is a Gaussian blur
            self.logits.weight.zero_()
            self.logits.bias.copy_((-(r[:, None] ** 2 + r[None, :] ** 2) / 4.5).flatten())

    def forward(self, features: Tensor) -> Tensor:
        k = self.kernel_size
        return torch.softmax(self.logits(features), dim=-1).view(-1, 1, k, k)


class KPN(nn.Module):
    """Five 3x3 convolutions predict features; a ``kernel="shared"`` DynamicConv applies their kernels."""

    def __init__(self, kernel_size: int = 7, width: int = 8, budget: str = "64MiB") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv2d(CHANNELS if i == 0 else width, width, 3, padding=1, padding_mode="reflect"), nn.ReLU()]
        self.predictor = nn.Sequential(*layers)
        self.filter = chunkconv.DynamicConv2d(
            KernelHead(width, kernel_size), CHANNELS, CHANNELS, kernel_size, padding=kernel_size // 2,
            padding_mode="reflect", bias=False, kernel="shared", inputs=("features",), budget=budget,
        )  # fmt: skip
        self.halo = max(5, kernel_size // 2)  # the CNN sees 11 x 11 pixels, the filter k x k

    def forward(self, noisy: Tensor) -> Tensor:
        return self.filter(noisy, features=self.predictor(noisy - 0.5))


def clean_slide(y0: int, x0: int, h: int, w: int, size: int):
    """The noise-free slide on rows ``[y0, y0 + h)`` and columns ``[x0, x0 + w)``: a function of the
    global coordinates, so chunks made apart meet without seams (pink stroma, purple nuclei).
    """
    import numpy as np

    y = np.arange(y0, y0 + h, dtype=np.float32)[:, None] / 37.0
    x = np.arange(x0, x0 + w, dtype=np.float32)[None, :] / 37.0
    t = np.sin(x + 1.7 * np.sin(0.31 * y)) * np.cos(1.3 * y + 1.1 * np.sin(0.23 * x))
    nuclei = (t > 0.55).astype(np.float32)
    tissue = 0.5 + 0.5 * np.sin(2 * np.pi * (x + 0.5 * y) * 37.0 / size)  # a slow gradient across the slide
    pink = np.array([0.93, 0.62, 0.78], np.float32)[:, None, None]
    purple = np.array([0.36, 0.20, 0.55], np.float32)[:, None, None]
    img = pink * (0.85 + 0.15 * tissue) * (1 - nuclei) + purple * nuclei
    return img.astype(np.float32)  # (3, h, w) in [0, 1]


def _slide_block(block_info=None):
    """One chunk of the noisy slide, uint8 (1, 3, h, w), its noise seeded by its chunk index."""
    import numpy as np

    info = block_info[None]
    (_, _), (_, _), (y0, y1), (x0, x1) = info["array-location"]
    size = info["shape"][-1]
    rng = np.random.default_rng((y0 * 1_000_003 + x0) % 2**32)
    img = clean_slide(y0, x0, y1 - y0, x1 - x0, size) + rng.normal(0, SIGMA, (3, y1 - y0, x1 - x0))
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)[None]


def train(model: KPN, steps: int, crop: int = 48, seed: int = 0) -> float:
    """A few Adam steps on random crops of the synthetic slide (clean and noisy); returns the last loss."""
    import numpy as np

    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = float("nan")
    for _ in range(steps):
        y0, x0 = (int(v) for v in rng.integers(0, 10_000, 2))
        clean = torch.from_numpy(np.stack([clean_slide(y0 + 97 * i, x0, crop, crop, 16_384) for i in range(4)]))
        noisy = (clean + SIGMA * torch.randn(clean.shape)).clamp(0, 1)
        out = model(noisy)
        mse = torch.mean((out - clean) ** 2)
        opt.zero_grad()
        mse.backward()
        opt.step()
        loss = float(mse.detach())
    return loss


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_crops(model: KPN, noisy, stored, size: int, crop: int) -> dict[str, float]:
    """The tiled output against the in-memory model on a corner and a central crop.

    In memory, the model runs on the crop extended by its halo (the corner's own border is the
    slide's): the outputs of the crop are then the whole slide's outputs. Returns the largest
    difference in float (the tiled float result recomputed for the crop) and in stored uint8 levels.
    """
    import numpy as np

    h = model.halo
    out = {}
    for name, (y0, x0) in {"corner": (0, 0), "centre": (size // 2 - crop // 2, size // 2 - crop // 2)}.items():
        a, b = max(0, y0 - h), min(size, y0 + crop + h)
        c, d = max(0, x0 - h), min(size, x0 + crop + h)
        window = torch.from_numpy(noisy[:, :, a:b, c:d].compute().astype(np.float32) / 255)
        with torch.no_grad():
            want = model(window)[:, :, y0 - a : y0 - a + crop, x0 - c : x0 - c + crop].numpy()
        got = stored[:, :, y0 : y0 + crop, x0 : x0 + crop].compute()
        levels = np.clip(np.round(want * 255), 0, 255).astype(np.uint8)
        out[name] = float(np.abs(levels.astype(int) - got.astype(int)).max())
    return out


def exact_on_a_crop(model: KPN, noisy, size: int, crop: int, chunk: int) -> float:
    """Float result of the tiled model on a sub-slide (chunked as the run) against the model in memory."""
    import numpy as np

    n = min(size, 2 * crop)
    x = noisy[:, :, :n, :n].rechunk((1, 3, min(chunk, n // 2), min(chunk, n // 2))).astype(np.float32) / 255
    got = chunkconv.tiled(model, x, halo=model.halo).compute(scheduler="threads")
    with torch.no_grad():
        want = model(torch.from_numpy(x.compute())).numpy()
    return float(np.abs(got - want).max())


def thumbnails(noisy, stored, size: int, chunk: int, out: Path, docs_png: Path | None) -> list[Path]:
    """Input and output at 1/step (block means, so the slide's large-scale shading shows), and a
    full-resolution crop across the corner where four tiles meet, their borders dashed (no seam).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no thumbnails")
        return []
    import dask.array as da
    import numpy as np

    step = max(1, size // 384)
    small = [
        da.coarsen(np.mean, a[0, :, : size - size % step, : size - size % step], {1: step, 2: step}, trim_excess=True)
        .compute()
        .transpose(1, 2, 0)
        / 255
        for a in (noisy, stored)
    ]
    z = min(size, 160)
    corner = (size // 2) // chunk * chunk if size > chunk else size // 2  # a corner where four tiles meet
    y0 = max(0, corner - z // 2)
    zoom = [a[0, :, y0 : y0 + z, y0 : y0 + z].compute().transpose(1, 2, 0) for a in (noisy, stored)]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
    titles = [
        f"noisy slide, {size} px (1/{step})",
        f"denoised, tiled (1/{step})",
        f"noisy, {z} px crop at a tile corner",
        "denoised: no seam at the tile borders",
    ]
    for i, (ax, img, title) in enumerate(zip(axes, [*small, *zoom], titles)):
        ax.imshow(img, interpolation="nearest")
        if i >= 2 and size > chunk:
            for line in (ax.axhline, ax.axvline):
                line(corner - y0 - 0.5, color="white", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "whole_slide.png"]
    fig.savefig(paths[0], dpi=90)
    if docs_png is not None:
        docs_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(docs_png, dpi=60)
        paths.append(docs_png)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16_384, help="slide side in pixels (default: 16384)")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk side in pixels, of the stores and tiles")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--memory-limit", default="1GiB", help="each worker's memory cap")
    parser.add_argument("--train-steps", type=int, default=150, help="Adam steps on synthetic crops before the run")
    parser.add_argument("--store", type=Path, default=Path("results/whole_slide"), help="where the Zarr stores go")
    parser.add_argument("--out", type=Path, default=None, help="where the thumbnail goes (default: --store)")
    parser.add_argument("--docs-png", type=Path, default=None, help="also save the docs' figure here")
    parser.add_argument("--smoke", action="store_true", help="seconds: a 512 x 512 slide in chunks of 128")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.chunk, args.train_steps = 512, 128, 5

    import dask.array as da
    import numpy as np
    from distributed import Client, LocalCluster, progress

    torch.manual_seed(0)
    model = KPN()
    loss = train(model, args.train_steps)
    model.eval()
    print(f"KPN trained for {args.train_steps} steps (last loss {loss:.4g}); declared halo {model.halo}")

    size, chunk = args.size, args.chunk
    raw, result = args.store / "slide.zarr", args.store / "denoised.zarr"
    for path in (raw, result):
        shutil.rmtree(path, ignore_errors=True)
    mpx = size * size / 1e6
    print(
        f"slide {size} x {size} RGB = {mpx:.1f} Mpx: {size * size * 3 / 2**20:.0f} MiB as uint8, "
        f"{size * size * 12 / 2**30:.2f} GiB as float32; {args.workers} workers capped at {args.memory_limit}"
    )
    with (
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, memory_limit=args.memory_limit, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        # 1. the slide, made chunk by chunk straight into the store (never whole in any process)
        t0 = time.perf_counter()
        spatial = da.core.normalize_chunks(chunk, (size,))[0]
        slide = da.map_blocks(_slide_block, dtype=np.uint8, chunks=((1,), (3,), spatial, spatial))
        write = client.compute(slide.to_zarr(str(raw), compute=False))
        progress(write)
        write.result()
        print(f"\nwrote {raw} in {time.perf_counter() - t0:.1f} s")

        # 2. the model over it, tile by tile, to another store
        noisy = da.from_zarr(str(raw))
        x = noisy.astype(np.float32) / 255
        plan = chunkconv.tile_plan(model, x, halo=model.halo)
        print(plan)
        y = chunkconv.tiled(model, x, halo=model.halo)
        stored_dask = da.clip(da.round(y * 255), 0, 255).astype(np.uint8)
        t0 = time.perf_counter()
        run = client.compute(stored_dask.to_zarr(str(result), compute=False))
        progress(run)
        run.result()
        seconds = time.perf_counter() - t0
        peaks = client.run(_peak_rss)
        print(f"\ndenoised {mpx:.1f} Mpx in {seconds:.1f} s: {mpx / seconds:.2f} Mpx/s on {args.workers} workers")
        for i, (address, peak) in enumerate(sorted(peaks.items())):
            print(f"  worker {i} ({address}): peak memory {peak / 2**20:.0f} MiB (cap {args.memory_limit})")

        # 3. the same numbers as the model in memory, and the pictures
        stored = da.from_zarr(str(result))
        crop = min(512, size // 2)
        levels = check_crops(model, noisy, stored, size, crop)
        for name, diff in levels.items():
            print(f"  {name} {crop}x{crop} crop: largest difference from the in-memory model {diff:.0f} uint8 levels")
        float_diff = exact_on_a_crop(model, noisy, size, crop, chunk)
        print(f"  tiled vs in-memory on a {min(size, 2 * crop)} px sub-slide, float32: max |diff| = {float_diff:.3g}")
        figures = thumbnails(noisy, stored, size, chunk, args.out or args.store, args.docs_png)
        for path in figures:
            print(f"  figure: {path}")
    return {
        "mpx_per_s": mpx / seconds,
        "peak_mib": max(peaks.values()) / 2**20,
        "levels": max(levels.values()),
        "float_diff": float_diff,
        "tiles": float(plan.num_tiles),
        "overhead": plan.overhead,
        "ok": float(math.isfinite(float_diff)),
    }


if __name__ == "__main__":  # the guard worker processes need
    main()
