"""``python -m benchmarks layers``: five published layers, direct against chunkconv, forward+backward on the CPU.

The layers and their sizes are in :mod:`benchmarks.layers`. Each workload is measured in a child
process whose address space may grow by at most the memory limit (:mod:`benchmarks.isolation`):

* **Side by side**: the direct implementation and chunkconv in one process, one warm-up call
  each (chunkconv's first call also plans), then ``repeats`` rounds alternating direct,
  chunkconv, direct, ... (so load on a shared machine hits both alike); the medians are
  reported. Then one call of each inside :class:`chunkconv.MemoryTracker`: the peak bytes
  allocated above the start (inputs, parameters and the output gradient exist before; the
  output and every gradient are counted).
* **Too large for the direct implementation**: where the direct peak measured at a smaller size
  of the same layer, scaled by the number of pixels (every tensor it makes is per pixel),
  exceeds the limit, chunkconv is measured alone, and the direct implementation is then tried
  once under the cap: it reads "out of memory under the X cap; needs ~Y" (or, should it fit
  after all, its one cold call).

One JSON document per run (machine facts as ``python -m benchmarks run`` records them, one
record per workload), rewritten after every case; a Markdown table next to it, and printed.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from chunkconv.budget import format_bytes
from chunkconv.memory import MemoryTracker

from .isolation import IsolatedWorker, run_methods
from .layers import LayerWorkload, build_layer, workloads
from .measure import _read_hwm, _reset_hwm, failure, time_alternating, warm_up
from .report import render_layers_run
from .runner import finish_run, machine_info, write_json, write_page

__all__ = ["LayerCase", "LayerSettings", "measure_layer_case", "run_layers"]

METHODS = ("direct", "chunkconv")
# Above this many pixels chunkconv's peak is the resident set's: MemoryTracker's CPU profiler keeps
# an event per op and per allocation, and chunkconv's thousands of ops per chunk over hundreds of
# chunks made the tracker itself run out of a 4 GiB cap (psf at 2048 x 2048).
TRACKED_PIXELS = 1024 * 1024
# recorded with each run: threading, and the C allocator's (glibc's thresholds, a preloaded allocator),
# which decide whether the direct code's large intermediates are faulted in afresh every step
_ENV = (
    "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS",
    "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD",
)  # fmt: skip
DEFAULT_LIMIT = 4 * 2**30


@dataclass(frozen=True)
class LayerCase:
    """One workload measured with some of ``METHODS``, side by side. Picklable (crosses to the child)."""

    workload: LayerWorkload
    methods: tuple[str, ...] = METHODS
    repeats: int = 3
    max_seconds: float = 60.0
    dtype: str = "float32"
    seed: int = 0
    track: bool = True  # peak by MemoryTracker; else only the process's peak resident set

    def key(self) -> str:
        return f"{self.workload.name} ({self.workload.describe()}): {', '.join(self.methods)}"

    def run(self) -> dict:
        """Measure in this process (what :class:`~benchmarks.isolation.IsolatedWorker` calls in its child)."""
        return measure_layer_case(self)


def _empty() -> dict:
    return {"status": "ok", "message": None, "first_s": None, "times_s": [], "median_s": None, "warm": None,
            "peak_bytes": None, "memory_message": None, "rss_peak_bytes": None, "info": {}}  # fmt: skip


def _plan_summary(plan: object) -> str:
    summary = f"{plan.num_chunks:,} chunk{'s' if plan.num_chunks != 1 else ''} of {plan.chunk_size:,}"
    peaks = [(n, v) for n, v in (("fwd", plan.forward_peak), ("bwd", plan.backward_peak)) if v is not None]
    if peaks:
        summary += "; planned peak " + ", ".join(f"{n} {format_bytes(v)}" for n, v in peaks)
    if plan.budget is not None:
        summary += f" (budget {format_bytes(plan.budget)})"
    return summary


def measure_layer_case(case: LayerCase) -> dict:
    """Time and peak memory of each method of ``case``, forward+backward; failures are results.

    Returns ``{"status", "methods": {method: {status, message, first_s, times_s, median_s, warm,
    peak_bytes, memory_message, rss_peak_bytes, info}}}``; ``status`` is ``"oom"`` when a method
    ran out of memory (so that an isolating worker replaces its process), else ``"ok"``. A call that
    fails only inside the memory tracker keeps its times, with ``peak_bytes=None`` and the reason
    in ``memory_message``. Without ``case.track`` the memory call runs untracked and only
    ``rss_peak_bytes`` (the peak resident set above its start) is known.
    """
    wl, dtype = case.workload, getattr(torch, case.dtype)
    torch.manual_seed(case.seed)
    layer = build_layer(wl, dtype)
    shape = (wl.batch, wl.channels, wl.size, wl.size)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    side = {n: torch.randn(wl.batch, c, wl.size, wl.size, dtype=dtype, requires_grad=True)
            for n, c in wl.side_channels.items()}  # fmt: skip
    grad_out = torch.randn(wl.batch, wl.out_channels, wl.size, wl.size, dtype=dtype)
    leaves = [x, *side.values(), *layer.parameters()]
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "direct": lambda: layer.direct(x, **side),
        "chunkconv": lambda: layer.chunked(x, budget=wl.budget, **side),
    }
    results = {m: _empty() for m in case.methods}

    def step(method: str) -> float:
        start = time.perf_counter()
        y = calls[method]()
        y.backward(grad_out)
        del y
        elapsed = time.perf_counter() - start
        clear()  # every call starts without gradients: their allocation is part of its cost
        return elapsed

    def clear(collect: bool = False) -> None:
        for leaf in leaves:
            leaf.grad = None
        if collect:  # after a failure: what the failed call held
            gc.collect()

    alive = warm_up(case.methods, results, step, clear)  # chunkconv's first call also plans (measures its generator)
    if "chunkconv" in alive:
        try:
            results["chunkconv"]["info"]["plan_summary"] = _plan_summary(layer.plan(x, budget=wl.budget, **side))
        except Exception as error:  # a report detail: never fail a measurement over it
            results["chunkconv"]["info"]["plan_summary"] = f"(plan unavailable: {type(error).__name__}: {error})"
    time_alternating(alive, results, step, clear, case.repeats, case.max_seconds)  # direct, chunkconv, direct, ...
    for method in alive:
        r = results[method]
        rss_start = _reset_hwm()
        if case.track:
            try:
                with MemoryTracker("cpu") as tracker:  # its profiler keeps an event per op and allocation
                    step(method)
                r["peak_bytes"] = tracker.peak
            except Exception as error:  # the times stand; the peak is unknown
                r["memory_message"] = "{}: {}".format(*failure(error))
                clear(collect=True)
                continue
        else:
            step(method)
            r["memory_message"] = "not tracked: the peak is the resident set's"
        hwm = _read_hwm()
        if hwm is not None and rss_start is not None:
            r["rss_peak_bytes"] = max(0, hwm - rss_start)
    lost = any(r["status"] == "ok" and r["peak_bytes"] is None and case.track for r in results.values())
    failed = lost or any(r["status"] == "oom" for r in results.values())
    status = "oom" if failed else "ok"
    return {"status": status, "message": None, "methods": results}


@dataclass(frozen=True)
class LayerSettings:
    """A layer run's settings; the CLI fills them in."""

    layers: tuple[str, ...] | None = None
    quick: bool = False
    sizes: tuple[int, ...] | None = None
    budget: str | None = None
    repeats: int = 3
    max_seconds: float = 60.0
    memory_limit: int | None = None
    isolate: bool = True
    case_timeout: float = 600.0
    threads: int | None = 2
    note: str | None = None


def _predicted_direct(wl: LayerWorkload, measured: dict[str, tuple[LayerWorkload, int]]) -> int | None:
    """The direct peak at ``wl``: a smaller measured size of the same layer scaled by the pixel count."""
    if wl.layer not in measured:
        return None
    small, peak = measured[wl.layer]
    return round(peak * (wl.batch * wl.size**2) / (small.batch * small.size**2))


def run_layers(settings: LayerSettings, out: Path, *, log: Callable[[str], None] = print) -> dict:
    """Measure every workload of ``settings``, writing the run's JSON to ``out`` after each one."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    limit = settings.memory_limit or DEFAULT_LIMIT
    chosen = workloads(settings.layers, quick=settings.quick, sizes=settings.sizes, budget=settings.budget)
    doc = {
        "schema": 1,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]]),
        "device": "cpu",
        "suite": "layers",
        "dtypes": ["float32"],
        "modes": ["fwd+bwd"],
        "repeats": settings.repeats,
        "max_seconds_per_case": settings.max_seconds,
        "memory_limit_bytes": limit,
        "isolated": settings.isolate,
        "note": settings.note,
        "machine": machine_info("cpu"),
        # OpenMP's waiting policy decides how chunkconv's many small ops fare on a loaded machine
        "environment": {k: os.environ[k] for k in _ENV if k in os.environ},
        "measurements": [],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"{len(chosen)} workloads -> {out} (memory limit {format_bytes(limit)})")
    started = time.perf_counter()
    worker = None
    if settings.isolate:
        worker = IsolatedWorker(limit, settings.case_timeout, settings.threads, str(out.with_suffix(".stderr.log")))

    def measure(case: LayerCase) -> dict:
        return run_methods(worker, case, _empty)

    measured: dict[str, tuple[LayerWorkload, int]] = {}
    try:
        for i, wl in enumerate(chosen, 1):
            predicted = _predicted_direct(wl, measured)
            track = wl.batch * wl.size**2 <= TRACKED_PIXELS
            record: dict = {"workload": wl.as_dict(), "direct_predicted_bytes": predicted}
            if predicted is None or predicted <= limit:
                record["methods"] = measure(LayerCase(wl, METHODS, settings.repeats, settings.max_seconds, track=track))
                record["direct_attempt"] = "measured"
            else:  # chunkconv alone, then one direct call under the cap
                chunked = LayerCase(wl, ("chunkconv",), settings.repeats, settings.max_seconds, track=track)
                record["methods"] = measure(chunked)
                record["methods"].update(measure(LayerCase(wl, ("direct",), 0, settings.max_seconds)))
                record["direct_attempt"] = "once under the cap"
            direct = record["methods"]["direct"]
            if direct["status"] == "ok" and direct["peak_bytes"] is not None and wl.layer not in measured:
                measured[wl.layer] = (wl, direct["peak_bytes"])
            doc["measurements"].append(record)
            write_json(out, doc)
            summary = "; ".join(f"{m} {_summary(r)}" for m, r in record["methods"].items())
            log(f"[{i}/{len(chosen)}] {wl.name}: {summary}")
    finally:
        if worker is not None:
            worker.close()
    return finish_run(doc, out, started)


def _summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']} ({r.get('message')})"
    peak = format_bytes(r["peak_bytes"]) if r["peak_bytes"] is not None else f"peak unknown ({r['memory_message']})"
    return f"{r['median_s'] * 1e3:.0f} ms / {peak}"


def main_layers(args) -> int:
    """``python -m benchmarks layers`` (the parsed arguments of :func:`benchmarks.__main__.main`)."""
    from chunkconv.budget import parse_budget

    settings = LayerSettings(
        layers=args.layers,
        quick=args.quick,
        sizes=args.sizes,
        budget=args.budget,
        repeats=args.repeats,
        max_seconds=args.max_seconds,
        memory_limit=parse_budget(args.memory_limit) if args.memory_limit else None,
        isolate=not args.no_isolate,
        case_timeout=args.case_timeout,
        threads=args.threads or None,
        note=args.note,
    )
    stem = args.name or f"cpu-layers-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out = Path(args.out)
    doc = run_layers(settings, out / f"{stem}.json")
    write_page(out, stem, render_layers_run(doc))
    return 0
