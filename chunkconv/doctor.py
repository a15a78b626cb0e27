"""``python -m chunkconv doctor``: what this machine runs, and a self-check of every path on it.

The report has two parts. What is here: versions (Python, torch, its CUDA runtime and cuDNN, the
NVIDIA driver, Triton, NumPy, chunkconv), devices (CPU threads and memory; each CUDA device's
name, capability and memory), the environment variables chunkconv and Triton read, and which
paths and backends can run on the chosen device, with the reason when one cannot. Then checks
that run on the device, each ``PASS``, ``FAIL`` or ``SKIP`` with its reason:

* every path (generic; fast in PyTorch; fast with the Triton kernels where they can run: on CUDA,
  or on the CPU under ``TRITON_INTERPRET=1``) against :func:`chunkconv.dynamic_conv_reference`,
  the unchunked float64 oracle on the CPU, on a few small random cases (1-3 spatial dims, groups,
  stride, dilation, padding modes, unbatched input, several chunks), output and the gradients of
  the input, the conv bias and every generator parameter. In float64 (float64 is the reference
  precision; the Triton kernels on CUDA have no float64), and on CUDA in float32 too, with a
  float32 (or TF32) tolerance. A Triton check fails if the kernels fell back to PyTorch.
* the peak memory measured by :class:`chunkconv.MemoryTracker` against the budget, on two sizes,
  forward only and training (forward, then backward), with a budget that forces several chunks.

A summary line ``doctor: N passed, M failed, K skipped`` ends the text report; the exit code is 1
if a check failed. ``--json`` prints the same report as one JSON object, for bug reports. The
checks take a few seconds on a CPU; nothing is downloaded or written.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import psutil
import torch
from torch import nn

from . import __version__
from .budget import format_bytes
from .fast.kernels import fallback, interpreting, tf32_allowed, triton_unavailable
from .functional import dynamic_conv, plan
from .memory import MemoryTracker
from .modules import DynamicConv
from .reference import dynamic_conv_reference

__all__ = ["Check", "report", "run"]

ENV_VARS = ("CHUNKCONV_TRITON", "TRITON_INTERPRET", "TRITON_CACHE_DIR", "CUDA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING")
# output and gradients within this fraction of the largest reference value (max |got - want| / max |want|)
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "tf32": 2e-2}


@dataclass
class Check:
    """One check's outcome: ``status`` is ``"PASS"``, ``"FAIL"`` or ``"SKIP"``."""

    name: str
    status: str
    detail: str
    seconds: float = 0.0


class _Skip(Exception):
    """Raised by a check that cannot run here; its message says why."""


# -- what is here ----------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton() -> dict[str, Any]:
    version = _version("triton")
    if version is None:
        return {"version": None, "importable": False, "error": "not installed"}
    try:
        importlib.import_module("triton")
    except Exception as error:  # a broken install: say how it breaks
        return {"version": version, "importable": False, "error": f"{type(error).__name__}: {error}"}
    return {"version": version, "importable": True, "error": None}


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            first = f.readline()
        for word in first.split():
            if word[0].isdigit() and "." in word:
                return word
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def versions() -> dict[str, Any]:
    """Versions of Python, torch (and the CUDA runtime it was built with), Triton, NumPy, chunkconv."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "chunkconv": __version__,
        "chunkconv_location": os.path.dirname(os.path.abspath(__file__)),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "hip_runtime": getattr(torch.version, "hip", None),
        "cudnn": cudnn,
        "nvidia_driver": _nvidia_driver(),
        "triton": _triton(),
        "numpy": _version("numpy"),
        "psutil": _version("psutil"),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def devices() -> dict[str, Any]:
    """The CPU (threads, memory) and each CUDA device (name, capability, memory)."""
    memory = psutil.virtual_memory()
    cpu = {
        "model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total": memory.total,
        "memory_available": memory.available,
    }
    cuda: list[dict[str, Any]] = []
    why_not = None
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            cuda.append(
                {
                    "index": index,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_total": total,
                    "memory_free": free,
                    "multiprocessors": props.multi_processor_count,
                }
            )
    elif torch.version.cuda is None:
        why_not = "this torch is built without CUDA"
    else:
        why_not = f"torch is built for CUDA {torch.version.cuda}, but sees no device (driver? CUDA_VISIBLE_DEVICES?)"
    return {"cpu": cpu, "cuda": cuda, "cuda_unavailable_reason": why_not}


def backends(device: torch.device) -> list[dict[str, Any]]:
    """Which paths and backends can run on ``device``, and why not."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    no_triton = triton_unavailable(device, dtype)
    if no_triton is not None and device.type == "cpu" and not interpreting():
        no_triton += " (TRITON_INTERPRET=1 runs them in Triton's CPU interpreter, for testing)"
    return [
        {"name": "generic path", "available": True, "reason": "any generator, any device and dtype"},
        {"name": "fast path, PyTorch", "available": True, "reason": "for generators ending in nn.Linear"},
        {
            "name": "fast path, Triton kernels",
            "available": no_triton is None,
            "reason": no_triton or ("in Triton's CPU interpreter" if device.type == "cpu" else "CUDA"),
        },
    ]


# -- checks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Case:
    shape: tuple[int, ...]
    out_channels: int
    kernel_size: int | tuple[int, ...]
    hidden: int | None  # None: a bare nn.Linear generator
    bias: bool
    chunk_size: int
    options: dict[str, Any] = field(default_factory=dict)  # stride, padding, dilation, groups, padding_mode

    def describe(self) -> str:
        gen = "Linear" if self.hidden is None else f"MLP({self.hidden})"
        extra = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{'x'.join(map(str, self.shape))} k={self.kernel_size} {gen}" + (f" {extra}" if extra else "")


# Small and varied: 1-3 spatial dims, groups, stride, dilation, padding modes, an unbatched input,
# hidden widths below and above the patch size, several chunks each.
CASES = (
    _Case((2, 4, 7, 6), 6, 3, 5, True, 17, {"padding": 1, "groups": 2}),
    _Case((2, 3, 20), 4, (5,), None, False, 7, {"stride": 2, "dilation": 2, "padding": 3}),
    _Case((1, 2, 4, 5, 4), 3, (3, 1, 3), 6, True, 11, {"padding": (1, 0, 1), "padding_mode": "reflect"}),
    _Case((3, 6, 5), 3, 2, 40, True, 9, {"padding": 1, "padding_mode": "circular"}),
)


def _generator(case: _Case, in_channels: int) -> nn.Module:
    k = case.kernel_size if isinstance(case.kernel_size, tuple) else (case.kernel_size,) * 2
    patch = in_channels * math.prod(k)
    weight = case.out_channels * (in_channels // case.options.get("groups", 1)) * math.prod(k)
    if case.hidden is None:
        return nn.Linear(patch, weight)
    return nn.Sequential(nn.Linear(patch, case.hidden), nn.Tanh(), nn.Linear(case.hidden, weight))


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _error(got: list[torch.Tensor], want: list[torch.Tensor], names: list[str]) -> tuple[float, str]:
    """The largest ``max |got - want| / max |want|`` over the tensors (absolute for all-zero ones), and whose."""
    worst, whose = 0.0, names[0]
    for a, e, name in zip(got, want, names):
        if not e.numel():
            continue
        scale = e.abs().max().item()
        diff = (a.detach().double().cpu() - e).abs().max().item()
        error = diff / scale if scale > 0 else diff
        if not error <= worst:  # NaN counts as the worst
            worst, whose = error, name
    return worst, whose


def _run_case(
    case: _Case, device: torch.device, dtype: torch.dtype, path: str, seed: int, want_backend: str | None
) -> tuple[float, str, str]:
    """One case on one path: the worst error of output and gradients against the reference, whose, and the path."""
    gen_rng = torch.Generator().manual_seed(seed)
    in_channels = case.shape[0] if len(case.shape) == _ndim(case) + 1 else case.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref_gen = _generator(case, in_channels).double()
    ref_x = torch.randn(case.shape, generator=gen_rng, dtype=torch.float64, requires_grad=True)
    ref_bias = torch.randn(case.out_channels, generator=gen_rng, dtype=torch.float64) if case.bias else None
    ref_bias = ref_bias.requires_grad_() if ref_bias is not None else None
    kwargs = dict(case.options)
    want = dynamic_conv_reference(
        ref_x, ref_gen, out_channels=case.out_channels, kernel_size=case.kernel_size, bias=ref_bias, **kwargs
    )
    upstream = torch.randn(want.shape, generator=gen_rng, dtype=torch.float64)
    ref_leaves = [ref_x, *([ref_bias] if ref_bias is not None else []), *ref_gen.parameters()]
    want_all = [want.detach(), *torch.autograd.grad(want, ref_leaves, upstream)]
    names = ["output", "input gradient", *(["bias gradient"] if ref_bias is not None else [])]
    names += [f"gradient of generator.{n}" for n, _ in ref_gen.named_parameters()]

    gen = copy.deepcopy(ref_gen).to(device, dtype)
    x = ref_x.detach().to(device, dtype).requires_grad_()
    bias = ref_bias.detach().to(device, dtype).requires_grad_() if ref_bias is not None else None
    args = (x, gen, case.out_channels, case.kernel_size)
    chosen = plan(*args, bias=bias, chunk_size=case.chunk_size, path=path, **kwargs).path
    name = str(chosen) if chosen is not None else path
    if want_backend is not None and (chosen is None or chosen.backend != want_backend):
        raise _Skip(f"{case.describe()}: the {want_backend} backend was not chosen: {name}")
    before = len(fallback.failures())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = dynamic_conv(*args, bias=bias, chunk_size=case.chunk_size, path=path, **kwargs)
        leaves = [x, *([bias] if bias is not None else []), *gen.parameters()]
        got_all = [y, *torch.autograd.grad(y, leaves, upstream.to(device, dtype))]
    if want_backend == "triton" and len(fallback.failures()) > before:
        reason = fallback.failures()[-1]
        raise AssertionError(
            f"{case.describe()}: the Triton kernels failed ({reason['stage']}: {reason['reason']}) "
            "and fell back to PyTorch"
        )
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # not ours to hide
    if tuple(y.shape) != tuple(want.shape):
        raise AssertionError(f"{case.describe()}: output shape {tuple(y.shape)}, expected {tuple(want.shape)}")
    error, whose = _error(got_all, want_all, names)
    return error, whose, name


def _ndim(case: _Case) -> int:
    return len(case.kernel_size) if isinstance(case.kernel_size, tuple) else 2


def _path_check(device: torch.device, dtype: torch.dtype, path: str, backend: str | None) -> Callable[[], str]:
    def check() -> str:
        if backend == "triton":
            why = triton_unavailable(device, dtype)
            if why is not None:
                if device.type == "cpu" and not interpreting():
                    why += " (set TRITON_INTERPRET=1 to check them in Triton's CPU interpreter)"
                raise _Skip(why)
        precision = str(dtype)[6:]
        if dtype == torch.float32 and device.type == "cuda" and tf32_allowed():
            precision = "tf32"
        tol = TOLERANCE[precision]
        turn_off = "0" if backend == "torch" else os.environ.get("CHUNKCONV_TRITON")
        worst, names = 0.0, set()
        cases = list(enumerate(CASES))
        if backend == "triton" and device.type == "cuda":
            # each case is a new key for the autotuner: compiling its configs takes seconds per case and
            # kernel on a fresh machine. Two cases cover bias and none, groups, an MLP and a bare Linear.
            cases = cases[:2]
        with _env("CHUNKCONV_TRITON", turn_off):
            for seed, case in cases:
                error, whose, name = _run_case(case, device, dtype, path, seed, backend)
                names.add(name.split(" (")[0].split(";")[0])
                if not error <= tol:
                    raise AssertionError(
                        f"{case.describe()}: the {whose} is off by {error:.2e} of its scale "
                        f"(tolerance {tol:.0e}) against the float64 reference"
                    )
                worst = max(worst, error)
        return (
            f"{len(cases)} cases, output and gradients within {worst:.1e} of the float64 reference "
            f"(tolerance {tol:.0e}); ran: {'; '.join(sorted(names))}"
        )

    return check


# (shape, hidden) of the memory checks: small, and larger
SIZES = (((1, 8, 48, 48), 16), ((2, 16, 64, 64), 32))


def _memory_check(device: torch.device, shape: tuple[int, ...], hidden: int, training: bool) -> Callable[[], str]:
    def check() -> str:
        # Triton's interpreter would take minutes at these sizes: under it, measure the PyTorch fast path
        with _env("CHUNKCONV_TRITON", "0" if interpreting() else os.environ.get("CHUNKCONV_TRITON")):
            return _measure(device, shape, hidden, training)

    return check


def _measure(device: torch.device, shape: tuple[int, ...], hidden: int, training: bool) -> str:
    channels = shape[1]
    patch = channels * 9
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        gen = nn.Sequential(nn.Linear(patch, hidden), nn.ReLU(), nn.Linear(hidden, channels * patch)).to(device)
        x = torch.randn(shape, device=device, requires_grad=training)
    # the budget: halfway (geometrically) between the smallest feasible and what one chunk needs
    probe = DynamicConv(gen, channels, channels, 3, padding=1, budget="auto").to(device)
    wide = probe.plan(x, training=training)
    unchunked = wide.unchunked_training if training else wide.unchunked_forward
    if wide.minimum_budget is None or unchunked is None:
        raise _Skip("the plan has no estimate for this device")
    budget = int(math.sqrt(wide.minimum_budget * max(unchunked, wide.minimum_budget)))
    layer = DynamicConv(gen, channels, channels, 3, padding=1, budget=budget).to(device)
    p = layer.plan(x, training=training)
    grad = contextlib.nullcontext() if training else torch.no_grad()
    with grad:
        with MemoryTracker(device) as forward:
            y = layer(x)
        peaks = [("forward", forward.peak)]
        if training:
            upstream = torch.ones_like(y)
            with MemoryTracker(device) as backward:
                y.backward(upstream)
            peaks.append(("backward", backward.peak))
    assert p.budget is not None
    measured = ", ".join(f"{name} {format_bytes(peak)}" for name, peak in peaks)
    path = str(p.path).split(" (")[0].split(";")[0] if p.path is not None else "?"
    over = [name for name, peak in peaks if peak > p.budget]
    if over:
        raise AssertionError(
            f"measured peak {measured} is above the budget of {format_bytes(p.budget)} "
            f"({p.num_chunks} chunks on the {path})"
        )
    return f"measured peak {measured} <= budget {format_bytes(p.budget)}; {p.num_chunks} chunks, {path}"


def checks(device: torch.device) -> list[tuple[str, Callable[[], str]]]:
    """The self-checks for ``device``, in order: ``(name, check)``; a check returns its detail."""
    found: list[tuple[str, Callable[[], str]]] = []
    dtypes = [torch.float64] + ([torch.float32] if device.type == "cuda" else [])
    for dtype in dtypes:
        d = str(dtype)[6:]
        found.append((f"generic path, {d}", _path_check(device, dtype, "generic", None)))
        found.append((f"fast path (PyTorch), {d}", _path_check(device, dtype, "fast", "torch")))
        found.append((f"fast path (Triton kernels), {d}", _path_check(device, dtype, "fast", "triton")))
    for shape, hidden in SIZES:
        size = "x".join(map(str, shape))
        for training in (False, True):
            name = f"budget honoured, {'training' if training else 'forward'}, {size}"
            found.append((name, _memory_check(device, shape, hidden, training)))
    return found


def _run_check(name: str, check: Callable[[], str]) -> Check:
    start = time.perf_counter()
    try:
        status, detail = "PASS", check()
    except _Skip as why:
        status, detail = "SKIP", str(why)
    except Exception as error:  # a check that fails for any reason is a FAIL, with what went wrong
        status, detail = "FAIL", str(error) if isinstance(error, AssertionError) else f"{type(error).__name__}: {error}"
    return Check(name, status, detail, round(time.perf_counter() - start, 2))


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"--device {device}: the doctor checks cpu and cuda devices")
    return device


def report(device: str | torch.device | None = None, *, progress: TextIO | None = None) -> dict[str, Any]:
    """The whole report as plain data (what ``--json`` prints); runs the checks on ``device``.

    Args:
        device: the device to check. Default: ``"cuda"`` if available, else ``"cpu"``.
        progress: where to print each check as it finishes (the text report). Default: nowhere.

    """
    dev = _device(device)
    data: dict[str, Any] = {
        "device": str(dev),
        "versions": versions(),
        "devices": devices(),
        "environment": {name: os.environ.get(name) for name in ENV_VARS},
        "backends": backends(dev),
    }
    if progress is not None:
        _print_header(data, progress)
    results = []
    for name, check in checks(dev):
        result = _run_check(name, check)
        results.append(result)
        if progress is not None:
            print(_check_line(result), file=progress, flush=True)
    data["checks"] = [asdict(c) for c in results]
    data["kernel_fallbacks"] = fallback.failures()
    count = {s: sum(c.status == s for c in results) for s in ("PASS", "FAIL", "SKIP")}
    data["summary"] = {"passed": count["PASS"], "failed": count["FAIL"], "skipped": count["SKIP"]}
    return data


def _print_header(data: dict[str, Any], out: TextIO) -> None:
    v, d = data["versions"], data["devices"]
    triton = v["triton"]
    if triton["version"] is None:
        triton_text = "not installed"
    elif triton["importable"]:
        triton_text = triton["version"]
    else:
        triton_text = f"{triton['version']}, but importing it fails: {triton['error']}"
    numpy = v["numpy"] or (
        "not installed (torch warns 'Failed to initialize NumPy' when imported; harmless for chunkconv, "
        "but Triton's CPU interpreter needs NumPy)"
    )
    lines = [
        "chunkconv doctor",
        "versions",
        f"  chunkconv      {v['chunkconv']} ({v['chunkconv_location']})",
        f"  python         {v['python']} ({v['python_implementation']}, {v['platform']})",
        f"  torch          {v['torch']}",
        f"  CUDA runtime   {v['cuda_runtime'] or 'none (a CPU-only torch)'}"
        + (f", cuDNN {v['cudnn']}" if v["cudnn"] else ""),
        f"  NVIDIA driver  {v['nvidia_driver'] or 'not found'}",
        f"  triton         {triton_text}",
        f"  numpy          {numpy}",
        f"  psutil         {v['psutil']}",
        "devices",
        f"  cpu            {d['cpu']['model']}: {d['cpu']['logical_cores']} logical cores, torch uses "
        f"{d['cpu']['torch_threads']} threads; memory {format_bytes(d['cpu']['memory_total'])}, "
        f"{format_bytes(d['cpu']['memory_available'])} available",
    ]
    for gpu in d["cuda"]:
        lines.append(
            f"  cuda:{gpu['index']:<9} {gpu['name']}, compute capability {gpu['capability']}, "
            f"{gpu['multiprocessors']} SMs; memory {format_bytes(gpu['memory_total'])}, "
            f"{format_bytes(gpu['memory_free'])} free"
        )
    if not d["cuda"]:
        lines.append(f"  cuda           none: {d['cuda_unavailable_reason']}")
    set_vars = ", ".join(f"{k}={val}" for k, val in data["environment"].items() if val is not None)
    lines.append(f"environment      {set_vars or 'none of ' + ', '.join(ENV_VARS) + ' is set'}")
    lines.append(f"what runs on {data['device']}")
    for b in data["backends"]:
        lines.append(f"  {b['name']:<27} {'yes' if b['available'] else 'no'}: {b['reason']}")
    lines.append(f"self-check on {data['device']} (against the unchunked float64 reference on the CPU)")
    if data["device"].startswith("cuda"):
        lines.append("  (the first run on a machine compiles and autotunes the Triton kernels, cached by Triton after)")
    print("\n".join(lines), file=out, flush=True)


def _check_line(check: Check) -> str:
    return f"  {check.status}  {check.name}: {check.detail} [{check.seconds:.1f} s]"


def run(device: str | None = None, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print the report (text, or one JSON object) and return the exit code: 1 if a check failed.

    Args:
        device: the device to check. Default: ``"cuda"`` if available, else ``"cpu"``.
        as_json: print one JSON object instead of the text report.
        out: where to print. Default: ``sys.stdout``.

    """
    out = out or sys.stdout
    try:
        data = report(device, progress=None if as_json else out)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = data["summary"]
    if as_json:
        print(json.dumps(data, indent=2, default=str), file=out)
    else:
        for failure in data["kernel_fallbacks"]:
            print(f"  kernel fallback: {failure['stage']} for {failure['config']}: {failure['reason']}", file=out)
        print(f"doctor: {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped", file=out)
    return 1 if summary["failed"] else 0
