"""Turn a suite into cases, measure them (isolated on the CPU), and write the run's JSON as it goes.

A run is one JSON document: what was measured on which machine (CPU model, cores, memory, GPU,
torch and chunkconv versions, git commit, date, load average), the settings (suite, dtypes,
repeats, memory limit) and one record per case with its estimate and its outcome. The file is
rewritten after every case, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

import chunkconv
from chunkconv.budget import format_bytes
from chunkconv.fast.kernels import tf32_allowed

from .isolation import IsolatedWorker
from .measure import Case, run_case, set_tf32
from .methods import Method, chunkconv_supports, default_methods
from .workloads import MODES, Workload, anchors, smoke, sweep

__all__ = ["SUITES", "Settings", "machine_info", "plan_cases", "finish_run", "run", "write_json", "write_page"]

SUITES = ("smoke", "anchors", "sweep", "all")
SCHEMA = 1


@dataclass(frozen=True)
class Settings:
    """Everything a run needs; the CLI fills it in."""

    device: str = "cpu"
    suite: str = "smoke"
    dtypes: tuple[str, ...] = ("float32",)
    modes: tuple[str, ...] = MODES
    repeats: int = 5
    max_seconds: float = 30.0
    memory_limit: int | None = None
    isolate: bool = True
    case_timeout: float = 600.0
    time_limit: float | None = None
    skip_by_estimate: bool = True
    sizes: tuple[int, ...] | None = None
    threads: int | None = None
    note: str | None = None
    methods: tuple[Method, ...] | None = None


def _sections(settings: Settings) -> list[tuple[str, list[Workload], list[Method]]]:
    dev, chosen = settings.device, settings.methods
    out = []
    if settings.suite == "smoke":
        out.append(("smoke", smoke(settings.sizes), list(chosen or default_methods(dev))))
    if settings.suite in ("anchors", "all"):
        out.append(("anchors", anchors(dev), list(chosen or default_methods(dev))))
    if settings.suite in ("sweep", "all"):
        out.append(("sweep", sweep(dev, settings.sizes), list(chosen or default_methods(dev, sweep=True))))
    return out


def plan_cases(settings: Settings) -> list[Case]:
    """Every case of the run, in the order measured: anchors before the sweep, dtype by dtype."""
    if settings.suite not in SUITES:
        raise ValueError(f"Invalid value for `suite`; expected one of {SUITES}, got suite={settings.suite!r}.")
    cases = []
    for _, workloads, methods in _sections(settings):
        for dtype in settings.dtypes:
            for wl in workloads:
                for mode in settings.modes:
                    for method in methods:
                        cases.append(
                            Case(wl, method, mode, dtype, settings.device, settings.repeats, settings.max_seconds)
                        )
    return cases


def _git_commit() -> str | None:
    root = Path(chunkconv.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "chunkconv", "benchmarks"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """Facts about the machine and software a reader needs to compare runs."""
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "memory_available_bytes": psutil.virtual_memory().available,
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "chunkconv": chunkconv.__version__,
        "chunkconv_commit": _git_commit(),
        "chunkconv_budget": chunkconv_supports("budget"),
        "chunkconv_path": chunkconv_supports("path"),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            tf32=tf32_allowed(),
        )
    return info


def _default_limit(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return min(8 * 2**30, psutil.virtual_memory().available // 2)


def finish_run(doc: dict, out: Path, started: float) -> dict:
    """Stamp a run's end (load average, elapsed seconds since ``started``), write it to ``out``, return it."""
    doc["machine"]["load_average_end"] = list(os.getloadavg())
    doc["elapsed_s"] = time.perf_counter() - started
    write_json(out, doc)
    return doc


def write_page(out: Path, stem: str, page: str) -> None:
    """Write a run's Markdown beside its JSON (``out/stem.md``) and print it."""
    (out / f"{stem}.md").write_text(page)
    print(page)
    print(f"wrote {out / stem}.json, .md")


def write_json(path: Path, doc: dict) -> None:
    """Write a run's JSON through a temporary file, so that a killed run leaves the last whole one."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def run(settings: Settings, out: Path, *, log: Callable[[str], None] = print) -> dict:
    """Measure every case of ``settings``, writing the run's JSON to ``out`` after each one."""
    if settings.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch.cuda.is_available() is False.")
        # the anchor workloads' fp32 baselines (benchmarks/workloads.py) were measured with TF32 off.
        set_tf32(False)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    limit = settings.memory_limit or _default_limit(settings.device)
    cases = plan_cases(settings)
    doc = {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]]),
        "device": settings.device,
        "suite": settings.suite,
        "dtypes": list(settings.dtypes),
        "modes": list(settings.modes),
        "repeats": settings.repeats,
        "max_seconds_per_case": settings.max_seconds,
        "memory_limit_bytes": limit,
        "isolated": settings.isolate and settings.device == "cpu",
        "note": settings.note,
        "machine": machine_info(settings.device),
        "measurements": [],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"{len(cases)} cases -> {out} (memory limit {format_bytes(limit)})")
    started = time.perf_counter()
    failed: dict[tuple, str] = {}  # sweep line -> first size where it failed
    worker = None
    if settings.isolate and settings.device == "cpu":
        log_path = str(out.with_suffix(".stderr.log"))
        worker = IsolatedWorker(limit, settings.case_timeout, settings.threads, log_path)
    try:
        for i, case in enumerate(cases, 1):
            record = _measure_one(case, limit, settings, worker, failed, started)
            doc["measurements"].append(record)
            write_json(out, doc)
            log(f"[{i}/{len(cases)}] {case.key()}: {_summary(record)}")
    finally:
        if worker is not None:
            worker.close()
    return finish_run(doc, out, started)


def _measure_one(
    case: Case, limit: int, settings: Settings, worker: IsolatedWorker | None, failed: dict, started: float
) -> dict:
    wl = case.workload
    itemsize = getattr(torch, case.dtype).itemsize
    estimate = case.method.estimate(wl, case.mode, itemsize)
    record = {
        "workload": wl.as_dict(),
        "method": {**case.method.as_dict(), "label": case.method.label, "unchunked": case.method.unchunked},
        "mode": case.mode,
        "dtype": case.dtype,
        "estimate_bytes": estimate,
    }
    line = (wl.family, case.method.label, case.mode, case.dtype)
    if settings.skip_by_estimate and estimate > limit:
        return {
            **record,
            "status": "skipped",
            "message": f"would need ~{format_bytes(estimate)}, over the {format_bytes(limit)} limit",
        }
    if settings.time_limit is not None and time.perf_counter() - started > settings.time_limit:
        return {
            **record,
            "status": "not run",
            "message": f"the run's time limit ({settings.time_limit:g} s) was reached",
        }
    if wl.family is not None and line in failed:
        return {**record, "status": "skipped", "message": f"not run: {failed[line]}"}
    result = worker.run(case) if worker is not None else run_case(case)
    if wl.family is not None and result["status"] in ("oom", "timeout", "crashed"):
        failed[line] = f"{result['status']} at {wl.size} px"
    return {**record, **result}


def _summary(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('message')}"
    return f"{record['median_s'] * 1e3:.1f} ms, peak {format_bytes(record['peak_bytes'])}"
