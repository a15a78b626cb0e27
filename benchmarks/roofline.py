"""How close chunkconv comes to the machine's own matrix-multiply rate: ``python -m benchmarks roofline``.

A dynamic convolution with the anchor generator ``Linear(P, hidden) -> ReLU -> Linear(hidden,
out * P)`` needs, per patch, the body's ``2 * P * hidden`` FLOPs and the bilinear contraction's
``2 * P * out * hidden`` (whichever order computes it: forming the weights and applying them, or
contracting the last Linear with the patch first). That is the count used here, the same for
both paths (bias additions, the ReLU and the final ``out * hidden`` dot are left out: under 3%).
A training step needs 3x the forward's FLOPs (forward, then the input and weight gradients);
chunkconv also recomputes the forward in backward, so it *executes* 4x. Both fractions are
reported: "useful" (3x, what any implementation must do) and "executed" (4x).

The reference rate is one large float32 GEMM, ``(4096 x 1024) @ (1024 x 4608)``, timed in the
same process just before each of the layer's timed calls (GEMM, fast forward, GEMM, fast training
step, ..., round after round). Each call's fraction is its FLOP rate over that GEMM's rate, and a
row reports the median of those paired fractions: on a shared machine the GEMM's own rate moved
between 100 and 190 GFLOP/s within one run, and a GEMM timed seconds apart misstated fractions by
as much. On CUDA the GEMM is cuBLAS with TF32 off.
Benchmarks report; nothing here asserts a rate.

    python -m benchmarks roofline [--device cpu] [--repeats 5] [--quick]
"""

from __future__ import annotations

import datetime as dt
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import chunkconv

from .measure import set_tf32
from .runner import machine_info, write_json, write_page
from .workloads import ANCHORS, Workload

__all__ = ["ROOFLINE_WORKLOADS", "first_call", "forward_flops", "gemm_rate", "render_roofline_run", "run_roofline"]

GEMM_SHAPE = (4096, 1024, 4608)  # M, K, N: the reference sgemm

ROOFLINE_WORKLOADS: tuple[Workload, ...] = (
    ANCHORS["CPU-A"],
    Workload("CPU-A wide", batch=2, channels=16, size=256, out_channels=16, hidden=128),
    Workload("CPU-A k5", batch=2, channels=16, size=256, out_channels=16, hidden=32, kernel=5),
)

QUICK_WORKLOADS: tuple[Workload, ...] = (
    Workload("quick", batch=1, channels=2, size=12, out_channels=2, hidden=4),
    Workload("quick k5", batch=1, channels=2, size=12, out_channels=3, hidden=4, kernel=5),
)

PATHS = ("fast", "generic")


def forward_flops(wl: Workload) -> int:
    """FLOPs of one forward: per patch, the body ``2 P h`` plus the contraction ``2 P out h``."""
    p, h = wl.patch_size, wl.hidden
    return wl.num_patches * (2 * p * h + 2 * p * wl.out_channels * h)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def gemm_rate(device: torch.device, shape: tuple[int, int, int] = GEMM_SHAPE) -> Callable[[], float]:
    """A function timing one float32 GEMM of ``shape`` (M, K, N) and returning its FLOP/s."""
    m, k, n = shape
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    c = torch.empty(m, n, device=device)

    def one() -> float:
        return 2 * m * k * n / _timed(lambda: torch.mm(a, b, out=c), device)

    one()  # warm-up
    return one


@dataclass
class _Layer:
    wl: Workload
    generator: nn.Module
    x: torch.Tensor

    @classmethod
    def build(cls, wl: Workload, device: torch.device) -> _Layer:
        torch.manual_seed(0)
        p = wl.patch_size
        gen = nn.Sequential(nn.Linear(p, wl.hidden), nn.ReLU(), nn.Linear(wl.hidden, wl.weight_numel)).to(device)
        x = torch.randn(wl.batch, wl.channels, wl.size, wl.size, device=device, requires_grad=True)
        return cls(wl, gen, x)

    def call(self, path: str) -> torch.Tensor:
        wl = self.wl
        return chunkconv.dynamic_conv2d(
            self.x, self.generator, wl.out_channels, wl.kernel, padding=wl.padding, path=path
        )

    def forward(self, path: str) -> None:
        with torch.no_grad():
            self.call(path)

    def train_step(self, path: str) -> None:
        y = self.call(path)
        y.backward(torch.ones_like(y))
        self.x.grad = None
        self.generator.zero_grad(set_to_none=True)


def _stack(wl: Workload, depth: int, device: torch.device) -> nn.Module:
    """A fresh model of ``depth`` layers of ``wl`` (in = out channels), with fresh generators: no plan cached."""
    if wl.channels != wl.out_channels:
        raise ValueError(f"Expected a workload with out_channels == channels to stack, got {wl}.")
    layers: list[nn.Module] = []
    for _ in range(depth):
        p = wl.patch_size
        gen = nn.Sequential(nn.Linear(p, wl.hidden), nn.ReLU(), nn.Linear(wl.hidden, wl.weight_numel))
        layers += [chunkconv.DynamicConv2d(gen, wl.channels, wl.out_channels, wl.kernel, padding=wl.padding), nn.ReLU()]
    return nn.Sequential(*layers).to(device)


def first_call(wl: Workload, device: torch.device, *, depth: int = 4, repeats: int = 3) -> dict:
    """A fresh ``depth``-layer model's first forward (which plans: probes each generator) against a warm one.

    Each round builds a new model (its generators have no cached plan) and times its first
    forward, then its warm forwards; a model is built and run once beforehand so that torch's
    own first-use costs are not counted.
    """
    x = torch.randn(wl.batch, wl.channels, wl.size, wl.size, device=device)
    with torch.no_grad():
        _stack(wl, 1, device)(x)
        firsts, warms = [], []
        for _ in range(repeats):
            model = _stack(wl, depth, device)
            firsts.append(_timed(lambda model=model: model(x), device))
            warms.append(min(_timed(lambda model=model: model(x), device) for _ in range(2)))
    first, warm = statistics.median(firsts), statistics.median(warms)
    return {"workload": wl.as_dict(), "depth": depth, "first": first, "warm": warm, "firsts": firsts,
            "warms": warms, "ratio": first / warm}  # fmt: skip


def run_roofline(
    device: str = "cpu",
    *,
    repeats: int = 5,
    workloads: tuple[Workload, ...] = ROOFLINE_WORKLOADS,
    gemm_shape: tuple[int, int, int] = GEMM_SHAPE,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every workload's forward and training step, both paths, beside the GEMM rate."""
    dev = torch.device(device)
    set_tf32(False)
    gemm = gemm_rate(dev, gemm_shape)
    doc: dict = {
        "suite": "roofline",
        "device": device,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "repeats": repeats,
        "gemm_shape": list(gemm_shape),
        "machine": machine_info(device),
        "records": [],
    }
    for wl in workloads:
        layer = _Layer.build(wl, dev)
        calls = {
            (path, mode): (layer.forward if mode == "fwd" else layer.train_step)
            for path in PATHS
            for mode in ("fwd", "fwd+bwd")
        }
        for (path, _mode), fn in calls.items():  # warm-up: probes, plans, caches
            fn(path)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
        rates: dict[tuple[str, str], list[float]] = {key: [] for key in calls}  # the GEMM just before each
        for _ in range(repeats):
            for (path, mode), fn in calls.items():
                rates[(path, mode)].append(gemm())
                times[(path, mode)].append(_timed(lambda fn=fn, path=path: fn(path), dev))
        flops = forward_flops(wl)
        for (path, mode), ts in times.items():
            t, paired = statistics.median(ts), rates[(path, mode)]
            useful = flops if mode == "fwd" else 3 * flops
            executed = flops if mode == "fwd" else 4 * flops
            fractions = [useful / ti / ri for ti, ri in zip(ts, paired)]
            executed_fractions = [executed / ti / ri for ti, ri in zip(ts, paired)]
            record = {
                "workload": wl.as_dict(),
                "path": path,
                "mode": mode,
                "seconds": t,
                "times": ts,
                "forward_flops": flops,
                "gemm_flops_per_s": statistics.median(paired),
                "gemm_rates": paired,
                "useful_fractions": fractions,
                "useful_fraction": statistics.median(fractions),
                "executed_fraction": statistics.median(executed_fractions),
            }
            doc["records"].append(record)
            log(
                f"{wl.name:<11} {path:<7} {mode:<7} {t * 1e3:9.1f} ms  {useful / t / 1e9:7.1f} GFLOP/s useful, "
                f"{record['useful_fraction']:5.1%} of the GEMM's (at {record['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s)"
                + (f" ({record['executed_fraction']:.1%} executed)" if mode != "fwd" else "")
            )
    wl = workloads[0]
    record = first_call(wl, dev, repeats=repeats)
    doc["first_call"] = record
    log(
        f"{wl.name:<11} a fresh {record['depth']}-layer model's first forward {record['first'] * 1e3:.0f} ms, "
        f"warm {record['warm'] * 1e3:.0f} ms: {record['ratio']:.2f}x"
    )
    doc["machine"]["load_average_end"] = list(__import__("os").getloadavg())
    return doc


def render_roofline_run(doc: dict, *, level: int = 2) -> str:
    """A roofline run as Markdown: the FLOP counts, the GEMM rate and each path's fraction of it."""
    mc = doc["machine"]
    h = "#" * level
    where = mc.get("gpu") or f"CPU: {mc['cpu']}, {mc['cpu_count']} cores, {mc['torch_threads']} torch threads"
    m, k, n = doc["gemm_shape"]
    lines = [
        f"{h} Roofline on {doc['device']}: fraction of the machine's GEMM rate",
        "",
        "The layer's FLOPs per forward are `N L (2 P h + 2 P out h)` (the generator's body and the "
        "bilinear contraction, the same count for both paths); a training step needs 3x that "
        "(*useful*) and chunkconv executes 4x (*executed*: the forward is recomputed in backward). "
        f"The reference is a float32 GEMM `({m} x {k}) @ ({k} x {n})` timed in the same process just "
        "before each timed call; a fraction is the median over rounds of a call's FLOP rate over that "
        "GEMM's rate, a time the median time: the two are medians taken apart, so a fraction is not "
        "the median time's rate over one GEMM rate (`benchmarks/roofline.py`).",
        "",
        f"- **Device**: {where}; torch {mc['torch']}; chunkconv {mc['chunkconv']} "
        f"(commit {mc.get('chunkconv_commit') or 'unknown'}).",
        f"- **Run**: {doc['date'][:16].replace('T', ' ')} UTC; median of {doc['repeats']} rounds after a "
        "warm-up; load average at start " + "/".join(f"{v:.2f}" for v in mc.get("load_average", [])) + ".",
        f"- **Command**: `{doc.get('command', 'python -m benchmarks roofline')}`",
        "",
        "| workload | GFLOP / fwd | path | forward | of GEMM | training step | useful | executed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["workload"]["name"], r["path"], r["mode"]): r for r in doc["records"]}
    names = list(dict.fromkeys(r["workload"]["name"] for r in doc["records"]))
    for name in names:
        for path in PATHS:
            f, t = by_key.get((name, path, "fwd")), by_key.get((name, path, "fwd+bwd"))
            if f is None or t is None:
                continue
            wl = f["workload"]
            shape = (
                f"{name}: N={wl['batch']} C={wl['channels']} {wl['size']}², out {wl['out_channels']}, "
                f"hidden {wl['hidden']}, k={wl['kernel']}"
            )
            lines.append(
                f"| {shape} | {f['forward_flops'] / 1e9:.1f} | {path} | {f['seconds'] * 1e3:.0f} ms | "
                f"{f['useful_fraction']:.0%} | {t['seconds'] * 1e3:.0f} ms | {t['useful_fraction']:.0%} | "
                f"{t['executed_fraction']:.0%} |"
            )
    rates = [x for r in doc["records"] for x in r["gemm_rates"]]
    if rates:
        lines += [
            "",
            f"GEMM rate over the run: {min(rates) / 1e9:.0f} to {max(rates) / 1e9:.0f} GFLOP/s, "
            f"median {statistics.median(rates) / 1e9:.0f}.",
        ]
    fc = doc.get("first_call")
    if fc:
        lines += [
            "",
            f"First call: a fresh {fc['depth']}-layer model of {fc['workload']['name']} layers (forward, no grad, "
            f"the fast path), median of {len(fc['firsts'])} fresh models: first forward {fc['first'] * 1e3:.0f} ms "
            f"(it plans: probes each generator), warm {fc['warm'] * 1e3:.0f} ms, **{fc['ratio']:.2f}x**.",
        ]
    return "\n".join(lines) + "\n"


def main_roofline(args) -> int:
    workloads = QUICK_WORKLOADS if args.quick else ROOFLINE_WORKLOADS
    gemm_shape = (256, 128, 256) if args.quick else GEMM_SHAPE
    if args.threads:
        torch.set_num_threads(args.threads)
    doc = run_roofline(args.device, repeats=args.repeats, workloads=workloads, gemm_shape=gemm_shape)
    doc["command"] = "python -m benchmarks " + shlex.join(sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{args.device.replace(':', '')}-roofline-{dt.datetime.now():%Y%m%d-%H%M%S}"
    write_json(out / f"{stem}.json", doc)
    write_page(out, stem, render_roofline_run(doc))
    return 0
