"""``python -m benchmarks tiled``: chunkconv.tiled over a Zarr store against the same model in memory.

An image that fits in memory (by default 2048 x 2048 RGB, float32) is written to a Zarr store;
then, each in a fresh process so that peaks do not mix:

* ``in-memory``: read the whole image, run the model on it, write the result;
* ``tiled <c>``: ``dask.array.from_zarr`` in chunks of ``c`` px, ``chunkconv.tiled``, ``to_zarr``,
  on Dask's threaded scheduler with one thread per core (one torch thread per task).

Each run reports its wall time (the fastest of ``--repeats``) and its peak resident memory above
the process's baseline after imports (``ru_maxrss``), beside the tile plan's predicted overhead
(the input elements the tiles read over the image's). The model is a small stack with a chunkconv
layer: two 3x3 convolutions (reflect padding) and a modulated 3x3 ``DynamicConv2d``.

    python -m benchmarks tiled                          # 2048 px, chunks 256, 512, 1024 (a few minutes)
    python -m benchmarks tiled --size 1024 --chunks 256,512 --repeats 1    # quicker
    python -m benchmarks tiled --quick                  # seconds: 256 px, chunks of 64 and 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["build_model", "main_tiled", "tiled_parser"]


def build_model(width: int = 16):
    """The benchmarked stack (float32, eval mode, seeded)."""
    import torch
    from torch import nn

    import chunkconv

    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(width * 9, 9), nn.Sigmoid())
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        chunkconv.DynamicConv2d(gen, width, 3, 3, padding=1, padding_mode="reflect", kernel="modulated"),
    ).eval()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(store: str, out: str, chunk: int, repeats: int) -> dict:
    """One measurement in this (fresh) process: ``chunk`` 0 means in memory."""
    import dask
    import dask.array as da
    import torch
    import zarr

    import chunkconv

    model = build_model()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    with torch.inference_mode():  # warm up: first-call costs (allocator, kernels) are not the tiling's
        model(torch.rand(1, 3, 64, 64))
    baseline = _rss()
    times = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        if chunk == 0:
            x = torch.from_numpy(zarr.open_array(store, mode="r")[...])
            with torch.inference_mode():
                y = model(x).numpy()
            zarr.create_array(out, shape=y.shape, chunks=(1, 3, 512, 512), dtype=y.dtype)[...] = y
            del x, y
        else:
            x = da.from_zarr(store).rechunk((1, 3, chunk, chunk))
            with dask.config.set(scheduler="threads", num_workers=cores):
                chunkconv.tiled(model, x).to_zarr(out)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"chunk": chunk, "seconds": min(times), "peak_bytes": max(0, peak - baseline)}


def _measure(store: str, chunk: int, repeats: int, tmp: str) -> dict:
    code = (
        "import json, sys; from benchmarks.tiled import _child; "
        f"print(json.dumps(_child({store!r}, {tmp + '/out-' + str(chunk) + '.zarr'!r}, {chunk}, {repeats})))"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"the measuring child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiled_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiled", help="chunkconv.tiled over a Zarr store against the model in memory (time, peak)")
    p.add_argument("--size", type=int, default=2048, help="image side in pixels (default: 2048)")
    p.add_argument("--chunks", default="256,512,1024", help="comma-separated chunk sides (default: 256,512,1024)")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration, the fastest kept (default: 2)")
    p.add_argument("--out", type=Path, default=Path("results"), help="where tiled.md and tiled.json go")
    p.add_argument("--quick", action="store_true", help="seconds: 256 px, chunks of 64 and 128, one run each")


def main_tiled(args: argparse.Namespace) -> int:
    import numpy as np
    import zarr

    import chunkconv

    if args.quick:
        args.size, args.chunks, args.repeats = 256, "64,128", 1
    size = args.size
    chunks = [int(c) for c in str(args.chunks).split(",") if c.strip()]
    model = build_model()
    with tempfile.TemporaryDirectory(prefix="chunkconv-tiled-") as tmp:
        store = f"{tmp}/in.zarr"
        image = zarr.create_array(store, shape=(1, 3, size, size), chunks=(1, 3, 256, 256), dtype="float32")
        rng = np.random.default_rng(0)
        for r in range(0, size, 256):
            image[:, :, r : r + 256] = rng.random((1, 3, min(256, size - r), size), dtype=np.float32)
        rows = [{**_measure(store, 0, args.repeats, tmp), "tiles": 1, "overhead": 1.0}]
        for c in chunks:
            plan = chunkconv.tile_plan(model, (1, 3, size, size), ((1,), (3,), *[tuple(_split(size, c))] * 2))
            rows.append({**_measure(store, c, args.repeats, tmp), "tiles": plan.num_tiles, "overhead": plan.overhead})
        base = rows[0]["seconds"]
        a = zarr.open_array(f"{tmp}/out-0.zarr", mode="r")[...]
        for row in rows[1:]:
            b = zarr.open_array(f"{tmp}/out-{row['chunk']}.zarr", mode="r")[...]
            row["max_abs_diff"] = float(np.abs(a - b).max())
    lines = [
        f"tiled vs in-memory: {size} x {size} RGB float32 ({size * size * 12 / 2**20:.0f} MiB), Zarr in and out, "
        f"{len(os.sched_getaffinity(0))} cores",
        "",
        "| run | tiles | predicted overhead | time (s) | time / in-memory | peak above baseline (MiB) | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        name = "in-memory" if row["chunk"] == 0 else f"tiled, chunks {row['chunk']} px"
        diff = f"{row['max_abs_diff']:.2g}" if "max_abs_diff" in row else "-"
        lines.append(
            f"| {name} | {row['tiles']} | {row['overhead']:.3f}x | {row['seconds']:.2f} | "
            f"{row['seconds'] / base:.2f}x | {row['peak_bytes'] / 2**20:.0f} | {diff} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tiled.md").write_text(text + "\n")
    (args.out / "tiled.json").write_text(json.dumps({"size": size, "rows": rows}, indent=1))
    print(f"\nwrote {args.out / 'tiled.md'} and {args.out / 'tiled.json'}")
    return 0


def _split(n: int, c: int) -> list[int]:
    return [min(c, n - s) for s in range(0, n, c)]
