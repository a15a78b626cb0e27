"""Measure one case (workload x method x mode x dtype) in the current process: time and peak memory.

Timing and memory are separate runs. The first call is timed but counts as a warm-up; then up to
``repeats`` timed calls (fewer when they would exceed ``max_seconds``), no tracker active; the
reported time is their median. Then one more call inside :class:`chunkconv.memory.MemoryTracker`
(CUDA: the caching allocator's peak statistics; CPU: allocator events from the profiler) gives the
peak bytes above the allocation at its start. On the CPU the process's peak resident set (``VmHWM``,
reset through ``/proc/self/clear_refs``) is recorded around that call too, as a cross-check that
also sees memory outside torch's allocator.

Running out of memory is a result (``status="oom"``), never an exception out of :func:`run_case`.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from chunkconv.memory import MemoryTracker

from .methods import Method
from .workloads import Workload

__all__ = ["Case", "failure", "is_out_of_memory", "run_case", "time_alternating", "warm_up"]

_OOM_MARKERS = (
    "out of memory",
    "not enough memory",
    "can't allocate memory",
    "cannot allocate memory",
    "std::bad_alloc",
    "CUBLAS_STATUS_ALLOC_FAILED",
)


@dataclass(frozen=True)
class Case:
    """One measurement to make. Picklable: it is sent to the measuring child process."""

    workload: Workload
    method: Method
    mode: str
    dtype: str
    device: str
    repeats: int = 5
    max_seconds: float = 30.0
    seed: int = 0

    def key(self) -> str:
        return f"{self.workload.name} {self.mode} {self.dtype} {self.method.label}"

    def run(self) -> dict:
        """Measure in this process: :func:`run_case`."""
        return run_case(self)


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 for float32 CUDA matmuls and convolutions, through torch's newer
    ``fp32_precision`` flags where they exist: mixing them with the legacy ``allow_tf32`` makes
    torch raise when either is read."""
    precision = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception means an allocation failed (CPU address-space limit or CUDA OOM)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(m.lower() in str(error).lower() for m in _OOM_MARKERS)


def failure(error: BaseException) -> tuple[str, str]:
    """A measurement's ``status`` (``"oom"`` or ``"error"``) and one-line ``message`` for an exception."""
    status = "oom" if is_out_of_memory(error) else "error"
    return status, f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"


def warm_up(methods: tuple[str, ...], results: dict[str, dict], step: Callable[[str], float],
            clear: Callable[[bool], None]) -> list[str]:  # fmt: skip
    """Call each method once (``first_s``); one that raises is marked failed. Return those that ran.

    ``results`` holds a record per method; ``step(method)`` times one call; ``clear(True)`` frees
    what a failed call held.
    """
    alive = []
    for method in methods:
        try:
            results[method]["first_s"] = step(method)
            alive.append(method)
        except Exception as error:
            results[method]["status"], results[method]["message"] = failure(error)
            clear(True)
    return alive


def time_alternating(alive: list[str], results: dict[str, dict], step: Callable[[str], float],
                     clear: Callable[[bool], None], repeats: int, max_seconds: float) -> None:  # fmt: skip
    """Time the methods in ``alive`` round after round, alternating, each within ``max_seconds``.

    A method that raises (e.g. out of memory under the cap on a later call) is marked failed and
    removed from ``alive``. Then each record has its ``times_s`` (the warm-up alone when there was
    no time for more, and ``warm`` false), and ``median_s``.
    """
    spent = {m: results[m]["first_s"] for m in alive}
    for _ in range(repeats):
        for method in list(alive):
            times = results[method]["times_s"]
            if spent[method] + (statistics.median(times) if times else results[method]["first_s"]) > max_seconds:
                continue
            try:
                times.append(step(method))
            except Exception as error:
                results[method]["status"], results[method]["message"] = failure(error)
                alive.remove(method)
                clear(True)
                continue
            spent[method] += times[-1]
    for method in alive:
        r = results[method]
        r["warm"] = bool(r["times_s"])
        r["times_s"] = r["times_s"] or [r["first_s"]]
        r["median_s"] = statistics.median(r["times_s"])


def _layer(wl: Workload, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, nn.Parameter]:
    """The anchor workloads' generator ``Linear(P, hidden) -> ReLU -> Linear(hidden, out * P)`` and a bias."""
    generator = nn.Sequential(nn.Linear(wl.patch_size, wl.hidden), nn.ReLU(), nn.Linear(wl.hidden, wl.weight_numel)).to(
        device=device, dtype=dtype
    )
    bias = nn.Parameter(0.1 * torch.randn(wl.out_channels, device=device, dtype=dtype))
    return generator, bias


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_hwm() -> int | None:
    """Peak resident set of this process in bytes (Linux), or ``None``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> int | None:
    """Reset the peak resident set to the current one; return the current resident set, or ``None``."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_case(case: Case) -> dict:
    """Measure ``case``; return a JSON-able dict with ``status`` ``"ok"``, ``"oom"`` or ``"error"``.

    Keys: ``status``, ``message``, ``times_s`` (the timed calls after the warm-up, or the warm-up
    alone when there was no time for more, then ``warm`` is false), ``median_s``, ``first_s``,
    ``peak_bytes`` (tracker), ``rss_peak_bytes`` (CPU), ``info`` (e.g. chunkconv's plan).
    """
    result: dict = {"status": "ok", "message": None, "times_s": [], "median_s": None, "first_s": None}
    result.update(warm=None, peak_bytes=None, rss_peak_bytes=None, info={})
    device = torch.device(case.device)
    dtype = getattr(torch, case.dtype)
    try:
        _measure(case, device, dtype, result)
    except Exception as error:
        result["status"], result["message"] = failure(error)
    finally:
        if result["status"] != "ok":  # the failed call's tensors may sit in reference cycles via its traceback
            gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _measure(case: Case, device: torch.device, dtype: torch.dtype, result: dict) -> None:
    wl, train = case.workload, case.mode == "fwd+bwd"
    torch.manual_seed(case.seed)
    generator, bias = _layer(wl, device, dtype)
    x = torch.randn(wl.batch, wl.channels, wl.size, wl.size, device=device, dtype=dtype, requires_grad=train)
    grad_out = torch.randn(wl.batch, wl.out_channels, wl.size, wl.size, device=device, dtype=dtype) if train else None
    fn, info = case.method.build(wl, generator, bias)
    if isinstance(fn, nn.Module):
        fn.to(device)
    info.update(case.method.plan_info(fn, x, train))  # also warms the planner's per-generator cache
    result["info"] = info
    leaves = [x, *generator.parameters(), bias, *(fn.parameters() if isinstance(fn, nn.Module) else ())]

    def step() -> None:
        if train:
            y = fn(x)
            y.backward(grad_out)
        else:
            with torch.no_grad():
                y = fn(x)
        del y
        _sync(device)

    def clear() -> None:  # every call starts without gradients: their allocation is part of its cost
        for leaf in leaves:
            leaf.grad = None

    def timed() -> float:
        _sync(device)
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        clear()
        return elapsed

    first = timed()
    result["first_s"] = first
    times: list[float] = []
    spent = first
    while len(times) < case.repeats and spent + (statistics.median(times) if times else first) <= case.max_seconds:
        times.append(timed())
        spent += times[-1]
    result["warm"] = bool(times)
    result["times_s"] = times or [first]
    result["median_s"] = statistics.median(result["times_s"])

    rss_start = _reset_hwm() if device.type == "cpu" else None
    with MemoryTracker(device) as tracker:
        step()
    hwm = _read_hwm() if rss_start is not None else None
    clear()
    result["peak_bytes"] = tracker.peak
    if hwm is not None and rss_start is not None:
        result["rss_peak_bytes"] = max(0, hwm - rss_start)
