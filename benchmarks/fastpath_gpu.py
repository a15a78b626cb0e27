"""Fast path vs the generic chunked path vs the best unchunked recipe, on workloads A and B.

Workloads A, B, C of benchmarks/workloads.py (generator Linear(P, hidden) -> ReLU -> Linear(hidden, out * P), k=3,
padding 1):

* A: training, forward + backward, N=8 C=32 256x256, out 32, hidden 64; target: fast path at least
  1.4x faster than the unchunked recipe, within 2 GB.
* B: inference (``torch.no_grad``), N=1 C=16 2048x2048, out 16, hidden 32; target: fp32 at least
  2.5x faster than the unchunked recipe within 1 GB, bf16 under 3 ms on an H100.

Methods, measured side by side in one run on one device: ``einsum`` (the best unchunked recipe,
``dynamic_conv_reference(method="einsum")``), ``generic`` (chunkconv, ``path="generic"``),
``fast-torch`` (``path="fast"`` with ``CHUNKCONV_TRITON=0``), ``fast`` (``path="fast"``: the fused
Triton kernels on CUDA). fp32 runs with TF32 off unless ``--tf32``; bf16 runs the generator and the
input in bfloat16. Times are medians of ``--repeats`` runs (CUDA events on CUDA); "peak" is the
most memory allocated above the allocation at entry (MemoryTracker), measured on a separate run.
The chunk size is the largest whose estimated working set fits the workload's budget (or
``--chunk-size``); the measured peak is printed next to the budget so the claim can be checked.

    python benchmarks/fastpath_gpu.py                    # both workloads, fp32 and bf16, on CUDA
    python benchmarks/fastpath_gpu.py --tiny --device cpu --repeats 1   # smoke test of the script
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's chunkconv, not an installed one
import chunkconv  # noqa: E402
from benchmarks.measure import is_out_of_memory, set_tf32  # noqa: E402
from chunkconv.fast import fast_path_bytes_per_patch  # noqa: E402
from chunkconv.geometry import conv_spec  # noqa: E402
from chunkconv.memory import MemoryTracker  # noqa: E402


@dataclass(frozen=True)
class Workload:
    name: str
    train: bool
    batch: int
    channels: int
    size: int
    out: int
    hidden: int
    budget: int  # bytes
    k: int = 3


WORKLOADS = {
    "A": Workload("A", True, 8, 32, 256, 32, 64, 2 * 10**9),
    "B": Workload("B", False, 1, 16, 2048, 16, 32, 1 * 10**9),
}
TINY = {
    "A": Workload("A", True, 2, 4, 16, 4, 8, 2 * 10**6),
    "B": Workload("B", False, 1, 4, 32, 4, 8, 1 * 10**6),
}
METHODS = ("einsum", "generic", "fast-torch", "fast")


def chunk_for_budget(w: Workload, method: str, dtype: torch.dtype) -> int:
    """The largest chunk whose estimated per-patch working set fits the budget (a stand-in planner).

    Per patch: the body's activations (2 x hidden) plus, on the generic path, the weights (and in
    training their gradient and the product), on the fast path its intermediates.
    """
    geom = conv_spec(2, in_channels=w.channels, out_channels=w.out, kernel_size=w.k, padding=1).geometry(
        (w.batch, w.channels, w.size, w.size)
    )
    size = dtype.itemsize
    body = (2 * w.hidden + geom.patch_size) * size * (3 if w.train else 1)
    if method == "generic":
        per_patch = body + geom.weight_numel * size * (3 if w.train else 1)
    else:
        fast = fast_path_bytes_per_patch(geom, w.hidden, dtype)
        per_patch = body + (fast.backward if w.train else fast.forward)
    fixed = 2 * geom.batch * w.channels * (w.size + 2) ** 2 * size  # padded input (+ its gradient)
    return max(1, min(geom.num_patches, int((w.budget - fixed) * 0.8) // per_patch))


def make(w: Workload, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    p = w.channels * w.k * w.k
    gen = nn.Sequential(nn.Linear(p, w.hidden), nn.ReLU(), nn.Linear(w.hidden, w.out * p)).to(device, dtype)
    x = torch.randn(w.batch, w.channels, w.size, w.size, device=device, dtype=dtype, requires_grad=w.train)
    return gen, x


def run_once(w: Workload, method: str, gen, x, chunk_size: int):
    os.environ["CHUNKCONV_TRITON"] = "0" if method == "fast-torch" else "1"
    with torch.set_grad_enabled(w.train):
        if method == "einsum":
            y = chunkconv.dynamic_conv_reference(x, gen, out_channels=w.out, kernel_size=w.k, padding=1)
        else:
            path = "generic" if method == "generic" else "fast"
            y = chunkconv.dynamic_conv2d(x, gen, w.out, w.k, padding=1, chunk_size=chunk_size, path=path)
        if w.train:
            y.backward(torch.ones_like(y))
            x.grad = None
            gen.zero_grad(set_to_none=True)
    return y


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (after the caller's warm-up)."""
    out = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bench(w: Workload, dtype: torch.dtype, device: str, repeats: int, chunk_size: int | None, methods) -> list[dict]:
    gen, x = make(w, device, dtype)
    rows = []
    for method in methods:
        chunk = chunk_size or chunk_for_budget(w, method, dtype)
        row = {"workload": w.name, "dtype": str(dtype).removeprefix("torch."), "method": method, "chunk": chunk}
        try:
            for _ in range(3):  # warm-up: Triton compiles and autotunes on the first calls
                run_once(w, method, gen, x, chunk)
            if device == "cuda":
                torch.cuda.synchronize()
            row["s"] = timed(lambda m=method, c=chunk: run_once(w, m, gen, x, c), device, repeats)
            with MemoryTracker(device) as tracker:
                run_once(w, method, gen, x, chunk)
            row["peak"] = tracker.peak
        except (torch.OutOfMemoryError, RuntimeError) as error:  # cuBLAS reports OOM as a RuntimeError
            if not is_out_of_memory(error):
                raise
            row["s"], row["peak"] = None, None
            row["note"] = "out of memory"
        if device == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def print_table(rows: list[dict], w: Workload) -> None:
    base = next((r["s"] for r in rows if r["method"] == "einsum" and r.get("s")), None)
    print(f"{'method':<11} {'time ms':>9} {'peak GB':>8} {'budget GB':>9} {'chunk':>8} {'speedup vs einsum':>18}")
    for r in rows:
        t = f"{r['s'] * 1e3:9.2f}" if r.get("s") else f"{r.get('note', '-'):>9}"
        peak = f"{r['peak'] / 1e9:8.3f}" if r.get("peak") is not None else f"{'-':>8}"
        ratio = f"{base / r['s']:17.2f}x" if base and r.get("s") else f"{'-':>18}"
        budget = "-" if r["method"] == "einsum" else f"{w.budget / 1e9:.3g}"
        print(f"{r['method']:<11} {t} {peak} {budget:>9} {r['chunk']:>8} {ratio}")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="AB")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, to check the script itself")
    args = ap.parse_args(argv)
    set_tf32(args.tf32)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    today = datetime.date.today()
    print(f"chunkconv fast path benchmark, {card}, torch {torch.__version__}, {today}, tf32={args.tf32}")
    everything = []
    for name in args.workloads:
        w = (TINY if args.tiny else WORKLOADS)[name]
        for dt in args.dtypes.split(","):
            dtype = getattr(torch, dt)
            kind = "train fwd+bwd" if w.train else "inference"
            print(f"\nWorkload {w.name} ({kind}, N={w.batch} C={w.channels} {w.size}x{w.size} out {w.out} "
                  f"hidden {w.hidden}), {dt}")  # fmt: skip
            rows = bench(w, dtype, args.device, args.repeats, args.chunk_size, args.methods.split(","))
            print_table(rows, w)
            everything += rows
    return everything


if __name__ == "__main__":
    main()
