"""``python -m benchmarks deform``: chunkconv's deformable convolution against torchvision's and a ``grid_sample`` one.

The workload is issue 19's: a DCNv2 training step in float32 (forward, then backward into the
input, the offsets, the mask, the weight and the bias), ``N=1``, 64 channels in and out, a 3x3
kernel, padding 1, one offset group, offsets drawn from ``N(0, 2 px)`` and a mask in ``[0, 1)``,
at 128 x 128 and 256 x 256; then at 1024 x 1024 with chunkconv under ``budget="1GB"`` (10**9 bytes,
as chunkconv reads "GB") and ``"1GiB"``. Methods
(:data:`METHODS`):

* ``chunkconv``: :func:`chunkconv.ops.deform_conv2d` (the sampled columns gathered per chunk,
  recomputed in backward);
* ``torchvision``: :func:`torchvision.ops.deform_conv2d` (its im2col columns ``C * K * L`` for
  the whole batch, made again in backward). Skipped, with the reason, where torchvision does not
  load: it is no dependency of chunkconv, and CI's environment has none;
* ``grid_sample``: :func:`grid_sample_deform_conv2d`, the implementation users write in plain
  PyTorch: the sampling grid of every tap, one ``F.grid_sample`` for all taps, times the mask,
  reshaped to columns, one matmul with the weight (unchunked; autograd keeps what it needs).

Before measuring, :func:`check_agreement` compares every available method with chunkconv's
float64 oracle (:func:`chunkconv.deform_reference.deform_conv_reference`) on a small case with
groups, offset groups, stride, padding and dilation: output and all five gradients. A method that
disagrees stops the run, so every baseline is a real deformable convolution.

Each size runs in a child process capped at the memory limit (:mod:`benchmarks.isolation`; on
CUDA in this process, out-of-memory errors caught), the methods side by side: one warm-up call
each, then ``repeats`` rounds alternating between them (load on a shared machine hits all alike),
medians reported; then one call of each inside :class:`chunkconv.MemoryTracker` for its peak
above the start (the inputs and the output gradient exist before; the output and every gradient
count). Where a method's peak measured at a smaller size, scaled by the number of pixels, exceeds
the limit, chunkconv is measured alone and that method is tried once under the cap: it reads
"out of memory under the X cap; needs ~Y" (or, should it fit after all, its one cold call).

    python -m benchmarks deform --threads 2          # 128, 256 and 1024 px (several minutes on 2 cores)
    python -m benchmarks deform --quick              # seconds: 4 channels, 12 and 24 px
    python -m benchmarks deform --device cuda        # the same on a GPU (no isolation; TF32 off)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

import chunkconv
import chunkconv.ops
from chunkconv.budget import format_bytes, parse_budget
from chunkconv.deform_reference import deform_conv_reference
from chunkconv.memory import MemoryTracker

from .isolation import IsolatedWorker, run_methods
from .layers_cpu import _plan_summary
from .measure import _read_hwm, _reset_hwm, failure, set_tf32, time_alternating, warm_up
from .runner import finish_run, machine_info, write_json, write_page

__all__ = [
    "METHODS",
    "DeformCase",
    "DeformSettings",
    "DeformWorkload",
    "check_agreement",
    "grid_sample_deform_conv2d",
    "main_deform",
    "measure_deform_case",
    "method_unavailable",
    "render_deform_run",
    "run_deform",
    "workloads",
]

METHODS = ("chunkconv", "torchvision", "grid_sample")
DEFAULT_LIMIT = 4 * 2**30
# Above this many pixels the peak is the resident set's (MemoryTracker's profiler keeps an event per op).
TRACKED_PIXELS = 1024 * 1024
TOLERANCE = 1e-10  # float64 agreement with the oracle required of every method


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def grid_sample_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """torchvision's ``deform_conv2d`` as users write it in PyTorch: ``F.grid_sample`` for all taps, one matmul.

    Tap ``(i, j)`` of output ``(y, x)`` samples the input at ``(y * sy - py + i * dy + off_y,
    x * sx - px + j * dx + off_x)`` (pixel units, integer = pixel centre). ``grid_sample`` with
    ``align_corners=False`` reads normalised ``g`` at pixel ``((g + 1) * size - 1) / 2``, so
    pixel ``p`` is ``g = (2 p + 1) / size - 1``; ``padding_mode="zeros"`` counts every grid point
    outside the input as zero, torchvision's rule. The samples of all taps, ``(N, C, K, L)``, are
    scaled by the mask and contracted with the weight as one ``(C_out, C_in K)`` matmul per
    group. Nothing is chunked: the columns exist for the whole input.

    Args:
        input: ``(N, C_in, H, W)``.
        offset: ``(N, G * K * 2, H_out, W_out)``, ``(dy, dx)`` per tap, taps row-major.
        weight: ``(C_out, C_in // groups, kh, kw)``.
        bias: ``(C_out,)`` or None. Default: ``None``.
        stride: an int or a pair. Default: ``1``.
        padding: an int or a pair (zeros). Default: ``0``.
        dilation: an int or a pair. Default: ``1``.
        mask: ``(N, G * K, H_out, W_out)`` or None. Default: ``None``.

    Returns:
        ``(N, C_out, H_out, W_out)``.
    """
    n, c, h, w = input.shape
    o, cg, kh, kw = weight.shape
    groups, k = c // cg, kh * kw
    ho, wo = offset.shape[-2:]
    g = offset.shape[1] // (2 * k)
    (sy, sx), (py, px), (dy, dx) = _pair(stride), _pair(padding), _pair(dilation)
    opts = {"dtype": input.dtype, "device": input.device}
    ty, tx = torch.meshgrid(torch.arange(kh, **opts) * dy, torch.arange(kw, **opts) * dx, indexing="ij")
    base_y = (torch.arange(ho, **opts) * sy - py).view(1, ho, 1) + ty.reshape(k, 1, 1)  # (K, Ho, 1)
    base_x = (torch.arange(wo, **opts) * sx - px).view(1, 1, wo) + tx.reshape(k, 1, 1)  # (K, 1, Wo)
    off = offset.view(n, g, k, 2, ho, wo)
    pos_y, pos_x = base_y + off[:, :, :, 0], base_x + off[:, :, :, 1]  # (N, G, K, Ho, Wo)
    grid = torch.stack(((2 * pos_x + 1) / w - 1, (2 * pos_y + 1) / h - 1), dim=-1).view(n * g, k * ho, wo, 2)
    cols = F.grid_sample(
        input.reshape(n * g, c // g, h, w), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    ).view(n, g, c // g, k, ho * wo)
    if mask is not None:
        cols = cols * mask.view(n, g, 1, k, ho * wo)
    cols = cols.reshape(n, groups, cg * k, ho * wo)
    out = torch.matmul(weight.reshape(groups, o // groups, cg * k), cols).reshape(n, o, ho, wo)
    return out if bias is None else out + bias.view(1, o, 1, 1)


def method_unavailable(method: str) -> str | None:
    """Why ``method`` cannot run here (its library does not load), or ``None`` when it can."""
    if method not in METHODS:
        raise ValueError(f"Invalid value for `method`; expected one of {METHODS}, got {method!r}.")
    if method != "torchvision":
        return None
    try:
        import torchvision.ops  # noqa: F401
    except (ImportError, OSError, RuntimeError) as error:  # absent, or built for another torch
        return f"torchvision does not load here ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})"
    return None


def _op(method: str, budget: str = "auto") -> Callable[..., Tensor]:
    """``(input, offset, weight, bias, stride, padding, dilation, mask) -> output`` of ``method``."""
    if method == "chunkconv":
        return lambda *args: chunkconv.ops.deform_conv2d(*args, budget=budget)
    if method == "torchvision":
        from torchvision.ops import deform_conv2d

        return deform_conv2d
    return grid_sample_deform_conv2d


def check_agreement(device: str = "cpu", methods: tuple[str, ...] = METHODS) -> dict[str, float]:
    """Each method's worst error against the float64 oracle: output and the five gradients, on a small case.

    The case has 2 conv groups, 2 offset groups, stride ``(2, 1)``, padding ``(1, 2)``, dilation
    ``(1, 2)``, a 3x2 kernel, a mask and offsets of a few pixels (some samples fall outside the
    input); chunkconv runs with several chunks.

    Returns:
        ``{method: max abs difference}`` over the output and every gradient, for ``methods``.
    """
    f64 = torch.float64
    gen = torch.Generator().manual_seed(7)
    n, c, h, w, o, groups, og, (kh, kw) = 2, 4, 9, 8, 6, 2, 2, (3, 2)
    stride, padding, dilation = (2, 1), (1, 2), (1, 2)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    k = kh * kw

    def leaf(*shape: int, scale: float = 1.0, uniform: bool = False) -> Tensor:
        t = torch.rand(shape, generator=gen, dtype=f64) if uniform else torch.randn(shape, generator=gen, dtype=f64)
        return (t * scale).to(device).requires_grad_()

    x, offset, mask = leaf(n, c, h, w), leaf(n, og * k * 2, ho, wo, scale=2.0), leaf(n, og * k, ho, wo, uniform=True)
    weight, bias = leaf(o, c // groups, kh, kw), leaf(o)
    leaves = (x, offset, mask, weight, bias)
    upstream = torch.randn(n, o, ho, wo, generator=gen, dtype=f64).to(device)
    args = (x, offset, weight, bias, stride, padding, dilation, mask)
    expected = deform_conv_reference(*args)
    want = torch.autograd.grad(expected, leaves, upstream)
    errors = {}
    for method in methods:
        got = _op(method, budget="auto")(*args) if method != "chunkconv" else _chunked(args)
        have = torch.autograd.grad(got, leaves, upstream)
        pairs = zip((got.detach(), *have), (expected.detach(), *want))
        errors[method] = max(float((a - b).abs().max()) for a, b in pairs)
    return errors


def _chunked(args: tuple) -> Tensor:
    return chunkconv.ops.deform_conv2d(*args, chunk_size=7)  # several chunks, one ending mid-row


@dataclass(frozen=True)
class DeformWorkload:
    """One size of the benchmarked layer: ``batch x channels x size x size``, square kernel, padding ``kernel // 2``."""

    size: int
    batch: int = 1
    channels: int = 64
    out_channels: int = 64
    kernel: int = 3
    offset_scale: float = 2.0  # offsets ~ N(0, offset_scale^2) pixels
    budget: str = "auto"  # chunkconv's

    @property
    def name(self) -> str:
        return f"deform-{self.size}"

    @property
    def taps(self) -> int:
        return self.kernel * self.kernel

    def describe(self) -> str:
        return (
            f"N={self.batch} C={self.channels}->{self.out_channels} k={self.kernel} pad {self.kernel // 2}, mask, "
            f"offsets N(0, {self.offset_scale:g} px)"
        )

    def columns_bytes(self, itemsize: int = 4) -> int:
        """The im2col buffer torchvision (and the grid_sample version) makes: ``C K N L`` elements."""
        return self.channels * self.taps * self.batch * self.size**2 * itemsize

    def as_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "batch": self.batch, "channels": self.channels,
                "out_channels": self.out_channels, "kernel": self.kernel, "offset_scale": self.offset_scale,
                "budget": self.budget, "describe": self.describe(),
                "columns_bytes": self.columns_bytes()}  # fmt: skip


def workloads(
    *, quick: bool = False, sizes: tuple[int, ...] | None = None, budget: str | None = None
) -> list[DeformWorkload]:
    """The benchmarked sizes: 128 and 256 px with chunkconv's default budget, 1024 px under each of ``budget``.

    ``budget``: comma-separated budgets for the sizes above 256 px (12 px when ``quick``), one
    workload per budget. Default: ``"1GB,1GiB"`` (issue 19's 1 GB, read as chunkconv reads it,
    10**9 bytes, and as 2**30); ``"256KB"`` when ``quick``. ``quick``: 4 channels at 12 and 24 px.
    ``sizes`` replaces the sizes.
    """
    small = 12 if quick else 256
    budgets = [b.strip() for b in (budget or ("256KB" if quick else "1GB,1GiB")).split(",") if b.strip()]
    shape = {"channels": 4, "out_channels": 4} if quick else {}
    chosen = sizes or ((12, 24) if quick else (128, 256, 1024))
    return [DeformWorkload(s, budget=b, **shape) for s in chosen for b in (["auto"] if s <= small else budgets)]


@dataclass(frozen=True)
class DeformCase:
    """One workload measured with some of :data:`METHODS`, side by side. Picklable (crosses to the child)."""

    workload: DeformWorkload
    methods: tuple[str, ...] = METHODS
    repeats: int = 3
    max_seconds: float = 60.0
    device: str = "cpu"
    seed: int = 0
    track: bool = True  # peak by MemoryTracker; else only the process's peak resident set (CPU)

    def run(self) -> dict:
        """Measure in this process (what :class:`~benchmarks.isolation.IsolatedWorker` calls in its child)."""
        return measure_deform_case(self)


def _empty() -> dict:
    return {"status": "ok", "message": None, "first_s": None, "times_s": [], "median_s": None, "warm": None,
            "peak_bytes": None, "phase_peak_bytes": None, "memory_message": None, "rss_peak_bytes": None,
            "info": {}}  # fmt: skip


def measure_deform_case(case: DeformCase) -> dict:
    """Time and peak memory of each method of ``case``, one training step each; failures are results.

    Returns ``{"status", "message", "methods": {method: {status, message, first_s, times_s,
    median_s, warm, peak_bytes, memory_message, rss_peak_bytes, info}}}``; ``status`` is ``"oom"``
    when a method ran out of memory (so that an isolating worker replaces its process).
    """
    wl, dev = case.workload, torch.device(case.device)
    torch.manual_seed(case.seed)
    k, s = wl.taps, wl.size
    x = torch.randn(wl.batch, wl.channels, s, s, device=dev, requires_grad=True)
    offset = (torch.randn(wl.batch, 2 * k, s, s, device=dev) * wl.offset_scale).requires_grad_()
    mask = torch.rand(wl.batch, k, s, s, device=dev, requires_grad=True)
    grad_out = torch.randn(wl.batch, wl.out_channels, s, s, device=dev)
    layer = chunkconv.ops.DeformConv2d(wl.channels, wl.out_channels, wl.kernel, padding=wl.kernel // 2)
    weight = layer.weight.detach().to(dev).requires_grad_()  # torchvision's initialisation
    bias = layer.bias.detach().to(dev).requires_grad_()
    leaves = (x, offset, mask, weight, bias)
    pad = wl.kernel // 2
    args = (x, offset, weight, bias, (1, 1), (pad, pad), (1, 1), mask)
    calls = {m: _op(m, wl.budget) for m in case.methods}
    results = {m: _empty() for m in case.methods}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def clear(collect: bool = False) -> None:
        for leaf in leaves:
            leaf.grad = None
        if collect:  # after a failure: what the failed call held
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    def step(method: str) -> float:
        sync()
        start = time.perf_counter()
        y = calls[method](*args)
        y.backward(grad_out)
        del y
        sync()
        elapsed = time.perf_counter() - start
        clear()  # every call starts without gradients: their allocation is part of its cost
        return elapsed

    alive = warm_up(case.methods, results, step, clear)  # chunkconv's first call also plans
    if "chunkconv" in alive:
        try:
            plan = chunkconv.plan(x, chunkconv.ops._ones(k), wl.out_channels, wl.kernel, bias, padding=pad,
                                  kernel="modulated", weight=weight, offsets=offset, mask=mask,
                                  budget=wl.budget)  # fmt: skip
            results["chunkconv"]["info"]["plan_summary"] = _plan_summary(plan)
        except Exception as error:  # a report detail: never fail a measurement over it
            results["chunkconv"]["info"]["plan_summary"] = f"(plan unavailable: {type(error).__name__}: {error})"
    time_alternating(alive, results, step, clear, case.repeats, case.max_seconds)  # chunkconv, torchvision, ...
    for method in alive:
        r = results[method]
        rss_start = _reset_hwm() if dev.type == "cpu" else None
        try:
            if case.track or dev.type == "cuda":
                with MemoryTracker(dev) as tracker:  # the step, and inside it each phase (what a budget bounds)
                    with MemoryTracker(dev) as forward:
                        y = calls[method](*args)
                    with MemoryTracker(dev) as backward:
                        y.backward(grad_out)
                    del y
                    clear()
                r["peak_bytes"] = tracker.peak
                r["phase_peak_bytes"] = {"fwd": forward.peak, "bwd": backward.peak}
            else:
                step(method)
                r["memory_message"] = "not tracked: the peak is the resident set's"
        except Exception as error:  # the times stand; the peak is unknown
            r["memory_message"] = "{}: {}".format(*failure(error))
            clear(collect=True)
            continue
        hwm = _read_hwm() if rss_start is not None else None
        if hwm is not None and rss_start is not None:
            r["rss_peak_bytes"] = max(0, hwm - rss_start)
    failed = any(r["status"] == "oom" or str(r["memory_message"]).startswith("oom") for r in results.values())
    return {"status": "oom" if failed else "ok", "message": None, "methods": results}


@dataclass(frozen=True)
class DeformSettings:
    """A deform run's settings; the CLI fills them in."""

    device: str = "cpu"
    quick: bool = False
    sizes: tuple[int, ...] | None = None
    budget: str | None = None
    methods: tuple[str, ...] = METHODS
    repeats: int = 3
    max_seconds: float = 60.0
    memory_limit: int | None = None
    isolate: bool = True
    case_timeout: float = 900.0
    threads: int | None = 2
    note: str | None = None


def _peak(r: dict) -> int | None:
    if r.get("status") != "ok":
        return None
    return r["peak_bytes"] if r["peak_bytes"] is not None else r.get("rss_peak_bytes")


def run_deform(settings: DeformSettings, out: Path, *, log: Callable[[str], None] = print) -> dict:
    """Check every available method against the oracle, then measure every workload, writing ``out`` after each."""
    cuda = settings.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"--device {settings.device} was asked for, but torch sees no CUDA device.")
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if cuda:
        set_tf32(False)  # every method's float32 matmuls in full float32, as on the CPU
        limit = settings.memory_limit or torch.cuda.get_device_properties(torch.device(settings.device)).total_memory
    else:
        limit = settings.memory_limit or DEFAULT_LIMIT
    isolate = settings.isolate and not cuda
    unavailable = {m: why for m in settings.methods if (why := method_unavailable(m))}
    methods = tuple(m for m in settings.methods if m not in unavailable)
    for method, why in unavailable.items():
        log(f"{method}: skipped, {why}")
    errors = check_agreement(settings.device, methods)
    log("float64 agreement with chunkconv.deform_reference (output and 5 gradients): "
        + ", ".join(f"{m} {e:.1e}" for m, e in errors.items()))  # fmt: skip
    wrong = {m: e for m, e in errors.items() if not e <= TOLERANCE}
    if wrong:
        raise RuntimeError(
            f"Expected every method to agree with the float64 oracle within {TOLERANCE:g}, got {wrong}: "
            "the benchmark would compare different operations."
        )
    chosen = workloads(quick=settings.quick, sizes=settings.sizes, budget=settings.budget)
    doc: dict = {
        "schema": 1,
        "suite": "deform",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]]),
        "device": settings.device,
        "dtypes": ["float32"],
        "modes": ["fwd+bwd"],
        "repeats": settings.repeats,
        "max_seconds_per_case": settings.max_seconds,
        "memory_limit_bytes": limit,
        "isolated": isolate,
        "note": settings.note,
        "machine": machine_info(settings.device),
        "torchvision": _torchvision_version(),
        "skipped": unavailable,
        "agreement": errors,
        "measurements": [],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"{len(chosen)} workloads -> {out} (memory limit {format_bytes(limit)})")
    started = time.perf_counter()
    worker = None
    if isolate:
        worker = IsolatedWorker(limit, settings.case_timeout, settings.threads, str(out.with_suffix(".stderr.log")))

    def measure(case: DeformCase) -> dict:
        return run_methods(worker, case, _empty)

    measured: dict[str, tuple[DeformWorkload, int]] = {}  # method -> its first measured size and peak
    sizes_done: set[int] = set()
    try:
        for i, wl in enumerate(chosen, 1):
            track = cuda or wl.batch * wl.size**2 <= TRACKED_PIXELS
            predicted = {
                m: round(peak * (wl.batch * wl.size**2) / (small.batch * small.size**2))
                for m, (small, peak) in measured.items()
                if m != "chunkconv"
            }
            # the other methods once per size: a second budget of the same size is chunkconv's alone
            first = wl.size not in sizes_done
            others = tuple(m for m in methods if m != "chunkconv") if first else ()
            sizes_done.add(wl.size)
            over = tuple(m for m in others if predicted.get(m, 0) > limit)
            side = tuple(m for m in methods if m == "chunkconv" or (m in others and m not in over))
            record: dict = {"workload": wl.as_dict(), "predicted_bytes": predicted, "methods": {}, "attempt": {}}
            if side:
                record["methods"].update(measure(DeformCase(wl, side, settings.repeats, settings.max_seconds,
                                                            settings.device, track=track)))  # fmt: skip
                record["attempt"].update(dict.fromkeys(side, "measured"))
            for method in over:  # alone, one call under the cap
                record["methods"].update(measure(DeformCase(wl, (method,), 0, settings.max_seconds, settings.device)))
                record["attempt"][method] = "once under the cap"
            if first:
                for method, why in unavailable.items():
                    record["methods"][method] = {**_empty(), "status": "skipped", "message": why}
                    record["attempt"][method] = "skipped"
            for method in record["methods"]:
                peak = _peak(record["methods"][method])
                if peak is not None and method not in measured:
                    measured[method] = (wl, peak)
            doc["measurements"].append(record)
            write_json(out, doc)
            log(
                f"[{i}/{len(chosen)}] {wl.name}: "
                + "; ".join(f"{m} {_summary(r)}" for m, r in record["methods"].items())
            )
    finally:
        if worker is not None:
            worker.close()
    return finish_run(doc, out, started)


def _torchvision_version() -> str | None:
    if method_unavailable("torchvision"):
        return None
    import torchvision

    return str(torchvision.__version__)


def _summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']} ({r.get('message')})"
    peak = _peak(r)
    return f"{r['median_s'] * 1e3:.0f} ms / " + (format_bytes(peak) if peak is not None else "peak unknown")


def _fmt_time(seconds: float) -> str:
    from .report import fmt_time

    return fmt_time(seconds)


def _cells(r: dict, limit: int, predicted: int | None) -> tuple[str, str]:
    """Time and peak cells of one method at one size."""
    if r["status"] == "ok":
        if r["peak_bytes"] is not None:
            peak = format_bytes(r["peak_bytes"])
            if r.get("phase_peak_bytes"):
                peak += " (fwd {}, bwd {})".format(*(format_bytes(r["phase_peak_bytes"][k]) for k in ("fwd", "bwd")))
        elif r.get("rss_peak_bytes") is not None:
            peak = f"{format_bytes(r['rss_peak_bytes'])} (resident set)"
        else:
            peak = f"not measured ({r.get('memory_message')})"
        return _fmt_time(r["median_s"]) + ("" if r.get("warm") else " (1 cold call)"), peak
    need = f"needs ~{format_bytes(predicted)} (extrapolated)" if predicted else ""
    if r["status"] == "oom":
        return f"out of memory under the {format_bytes(limit)} cap", need
    if r["status"] == "skipped":
        return "skipped", "-"
    return r["status"], need or "-"


def _targets(doc: dict) -> list[str]:
    """Issue 19's targets, checked on the run's own numbers (nothing when its sizes lack them)."""
    lines = []
    by_size = {rec["workload"]["size"]: rec for rec in doc["measurements"]}
    rec = by_size.get(256)
    if rec is not None:
        cc, tv = rec["methods"].get("chunkconv", {}), rec["methods"].get("torchvision", {})
        if cc.get("status") == "ok" and tv.get("status") == "ok":
            t = cc["median_s"] / tv["median_s"]
            fastest = min(cc["times_s"]) / min(tv["times_s"])
            line = (
                f"- 256 px, time <= 0.5x torchvision's: {t:.2f}x (fastest calls {fastest:.2f}x), "
                f"{'met' if t <= 0.5 else 'missed'}"
            )
            cp, tp = _peak(cc), _peak(tv)
            if cp is not None and tp is not None:
                p = cp / tp
                line += f"; peak <= 0.5x: {p:.2f}x, {'met' if p <= 0.5 else 'missed'}"
            lines.append(line + ".")
        elif tv.get("status") == "skipped":
            lines.append("- 256 px: no ratios, torchvision was skipped.")
    for rec in doc["measurements"]:
        if rec["workload"]["size"] != 1024:
            continue
        cc, budget = rec["methods"].get("chunkconv", {}), rec["workload"]["budget"]
        peak = _peak(cc)
        phases = cc.get("phase_peak_bytes")
        if peak is not None and budget != "auto":
            limit = parse_budget(budget)
            line = f"- 1024 px within `budget={budget!r}` ({format_bytes(limit)}): "
            if phases:  # the budget bounds each call, forward and backward (docs/memory.md)
                held = max(phases.values()) <= limit
                line += (
                    f"forward {format_bytes(phases['fwd'])}, backward {format_bytes(phases['bwd'])}, "
                    f"{'met' if held else 'missed'}; the whole step peaks at {format_bytes(peak)} (the output, "
                    "made in forward, is alive during backward)."
                )
            else:
                line += f"peak {format_bytes(peak)}, {'met' if peak <= limit else 'missed'}."
            lines.append(line)
        elif cc:
            lines.append(f"- 1024 px within `budget={budget!r}`: not run ({cc.get('status')}: {cc.get('message')}).")
    return ["Issue 19's targets, from this run:", "", *lines, ""] if lines else []


def render_deform_run(doc: dict, *, level: int = 2) -> str:
    """A ``python -m benchmarks deform`` run as Markdown: the agreement check, a row per method and size."""
    h = "#" * level
    mc = doc["machine"]
    limit = doc["memory_limit_bytes"]
    where = mc.get("gpu") or f"CPU: {mc['cpu']}, {mc['cpu_count']} cores, {mc['torch_threads']} torch threads"
    load = "/".join(f"{v:.2f}" for v in mc.get("load_average", []))
    end = "/".join(f"{v:.2f}" for v in mc.get("load_average_end", []))
    when = doc["date"][:16].replace("T", " ")
    agreement = ", ".join(f"{m} {e:.1e}" for m, e in doc["agreement"].items())
    lines = [
        f"{h} Deformable convolution on {doc['device']}: float32 training step, {when} UTC",
        "",
        f"- **Device**: {where}; torch {mc['torch']}; torchvision {doc.get('torchvision') or 'not installed'}; "
        f"chunkconv {mc['chunkconv']} (commit {mc.get('chunkconv_commit') or 'unknown'}).",
        f"- **Run**: median of up to {doc['repeats']} alternating rounds after a warm-up (fewer when a method "
        f"would take over {doc['max_seconds_per_case']:g} s); memory limit {format_bytes(limit)}"
        + (" (address-space cap of the measuring child process)" if doc.get("isolated") else "")
        + f"; load average (1/5/15 min) at start {load}" + (f", at end {end}" if end else "")
        + (f"; {doc['note']}" if doc.get("note") else "") + ".",
        f"- **Checked first**: worst difference from the float64 oracle `chunkconv.deform_reference` over the "
        f"output and the gradients of input, offset, mask, weight and bias: {agreement}.",
        *(f"- **Skipped**: {m}: {why}." for m, why in doc.get("skipped", {}).items()),
        f"- **Command**: `{doc.get('command', 'python -m benchmarks deform')}`",
        "",
        "| image | method | time | peak | time / torchvision | peak / torchvision | notes |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    tv_at: dict[int, dict] = {}  # torchvision's result at each size (a second budget's record has none)
    for rec in doc["measurements"]:
        wl, methods = rec["workload"], rec["methods"]
        tv = tv_at.setdefault(wl["size"], methods.get("torchvision", {}))
        tv_time = tv["median_s"] if tv.get("status") == "ok" else None
        tv_peak = _peak(tv) if tv else None
        for method, r in methods.items():
            predicted = rec.get("predicted_bytes", {}).get(method)
            t, p = _cells(r, limit, predicted)
            tr = pr = "-"
            if method != "torchvision" and r["status"] == "ok":
                if tv_time:
                    tr = f"{r['median_s'] / tv_time:.2f}x ({min(r['times_s']) / min(tv['times_s']):.2f}x)"
                peak = _peak(r)
                if peak is not None and tv_peak:
                    pr = f"{peak / tv_peak:.2f}x"
                elif peak is not None and rec.get("predicted_bytes", {}).get("torchvision"):
                    pr = f"{peak / rec['predicted_bytes']['torchvision']:.3f}x est."
            notes = ""
            if method == "chunkconv":
                detail = r.get("info", {}).get("plan_summary", "") if r["status"] == "ok" else r.get("message")
                notes = f"budget {wl['budget']}: {detail or ''}".rstrip(": ")
            elif rec.get("attempt", {}).get(method) == "once under the cap":
                notes = "tried once under the cap"
            elif r["status"] != "ok":
                notes = str(r.get("message") or "")
            lines.append(f"| {wl['size']}x{wl['size']} | {method} | {t} | {p} | {tr} | {pr} | {notes} |")
    first = doc["measurements"][0]["workload"] if doc["measurements"] else None
    lines += [
        "",
        (f"Workload: {first['describe']}; torchvision's columns are `C K N L` floats "
         f"({format_bytes(first['columns_bytes'])} at {first['size']} px, 16x that at 4x the side)." if first else ""),
        "Ratios are against torchvision (below 1: smaller / faster); the time ratio in parentheses is that of "
        "the fastest calls (the least disturbed by other load); \"est.\" divides by torchvision's peak "
        "at the smaller size scaled by the pixel count. Peaks are `chunkconv.MemoryTracker`'s: bytes allocated "
        "above the start of the call (inputs, parameters and the output gradient exist before; the output and "
        "every gradient count).",
        "",
        *_targets(doc),
    ]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def main_deform(args: argparse.Namespace) -> int:
    """``python -m benchmarks deform`` (the parsed arguments of :func:`benchmarks.__main__.main`)."""
    settings = DeformSettings(
        device=args.device,
        quick=args.quick,
        sizes=args.sizes,
        budget=args.budget,
        methods=args.methods,
        repeats=args.repeats,
        max_seconds=args.max_seconds,
        memory_limit=parse_budget(args.memory_limit) if args.memory_limit else None,
        isolate=not args.no_isolate,
        case_timeout=args.case_timeout,
        threads=args.threads or None,
        note=args.note,
    )
    stem = args.name or f"{args.device.replace(':', '')}-deform-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out = Path(args.out)
    doc = run_deform(settings, out / f"{stem}.json")
    write_page(out, stem, render_deform_run(doc))
    return 0
