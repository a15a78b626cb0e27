"""Fast path vs generic chunked path on the CPU workload, forward + backward, side by side.

Workload CPU-A of benchmarks/workloads.py: N=2, C=16, 256x256, out 16, hidden 32, k=3 (padding 1), float32,
generator Linear(144, 32) -> ReLU -> Linear(32, 16 * 144). Both paths run with the same chunk
size, interleaved (fast, generic, fast, ...) so that load on the shared machine hits both alike;
the medians of ``--repeats`` runs are printed, then one untimed run of each under MemoryTracker.

    python benchmarks/fastpath_cpu.py [--repeats 5] [--chunk-size 1024] [--size 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's chunkconv, not an installed one
import chunkconv  # noqa: E402
from chunkconv.memory import MemoryTracker  # noqa: E402


def workload(size: int, batch: int = 2, channels: int = 16, out: int = 16, hidden: int = 32, k: int = 3):
    torch.manual_seed(0)
    p = channels * k * k
    gen = nn.Sequential(nn.Linear(p, hidden), nn.ReLU(), nn.Linear(hidden, out * p))
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    return gen, x, out, k


def step(gen, x, out, k, path, chunk_size):
    y = chunkconv.dynamic_conv2d(x, gen, out, k, padding=1, chunk_size=chunk_size or None, path=path)
    y.backward(torch.ones_like(y))
    x.grad = None
    gen.zero_grad(set_to_none=True)


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=1024, help="0: each path's default chunk size")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--no-memory", action="store_true", help="skip the MemoryTracker runs")
    args = ap.parse_args(argv)
    gen, x, out, k = workload(args.size)
    paths = ("fast", "generic")
    for path in paths:  # warm-up
        step(gen, x, out, k, path, args.chunk_size)
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(args.repeats):
        for path in paths:
            t0 = time.perf_counter()
            step(gen, x, out, k, path, args.chunk_size)
            times[path].append(time.perf_counter() - t0)
    med = {p: statistics.median(t) for p, t in times.items()}
    print(
        f"CPU workload N=2 C=16 {args.size}x{args.size} out 16 hidden 32 k=3, fwd+bwd, float32, "
        f"chunk_size={args.chunk_size or 'default'}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"{'path':<8} {'median s':>9} {'min s':>8} {'max s':>8}  runs")
    for p in paths:
        t = times[p]
        print(f"{p:<8} {med[p]:9.3f} {min(t):8.3f} {max(t):8.3f}  {', '.join(f'{v:.3f}' for v in t)}")
    pairs = [f / g for f, g in zip(times["fast"], times["generic"])]
    print(
        f"fast / generic: {med['fast'] / med['generic']:.2f} (ratio of medians), "
        f"{statistics.median(pairs):.2f} (median of the {len(pairs)} back-to-back pairs)"
    )
    if not args.no_memory:
        for p in paths:
            with MemoryTracker("cpu") as tracker:
                step(gen, x, out, k, p, args.chunk_size)
            print(f"{p:<8} peak above entry: {tracker.peak / 2**20:.1f} MiB")
    return med


if __name__ == "__main__":
    main()
