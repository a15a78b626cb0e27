"""Run CPU measurements in a child process whose address space is capped, so none can exhaust the machine.

:class:`IsolatedWorker` starts one ``spawn``-ed child, warms torch up there (thread pools, lazy
initialisation) and caps its address space (the soft ``resource.RLIMIT_AS``) at its size after
warming up plus ``limit_bytes``: a fixed ceiling, so memory a case fails to give back only shrinks
the headroom of later cases, never raises it. Cases are sent to it one at a time: any picklable
object whose ``run()`` returns a dict with a ``status`` (:class:`~benchmarks.measure.Case`,
:class:`~benchmarks.layers_cpu.LayerCase`). An allocation beyond the cap fails inside the child
with torch's "not enough memory" error (or ``std::bad_alloc``), which the case reports as
``status="oom"``.
After each case the child returns freed heap to the OS (``malloc_trim``); after a case that did
not finish, or one that left more than :data:`RETAINED_LIMIT` bytes mapped, the child is
replaced by a fresh one (native code unwinding from a failed allocation may leak). A child that
dies (a signal, the kernel's OOM killer) or exceeds the per-case timeout is reported as
``"crashed"``/``"timeout"`` and replaced too. The parent never allocates any of it.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import os
import resource
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Protocol

from .measure import Case, failure

__all__ = ["RETAINED_LIMIT", "IsolatedWorker", "Measurable", "MethodsCase", "address_space_bytes", "run_methods"]


class Measurable(Protocol):
    """What a worker runs: picklable, ``run()`` measures in the current process."""

    def run(self) -> dict: ...


class MethodsCase(Measurable, Protocol):
    """A case that measures several methods side by side (the layers and deform suites)."""

    methods: tuple[str, ...]


# A child still mapping this much more than after its warm-up is replaced before the next case.
RETAINED_LIMIT = 256 * 2**20


def address_space_bytes() -> int:
    """This process's current virtual memory size (``VmSize``) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize not found in /proc/self/status")


def _warm_up() -> None:
    import torch

    x = torch.randn(64, 4, 16, 16, requires_grad=True)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    (conv(x).relu() @ torch.randn(16, 16)).sum().backward()
    torch.einsum("rop,rp->ro", torch.randn(8, 4, 4), torch.randn(8, 4))


def _serve(conn: Connection, limit_bytes: int | None, threads: int | None, log_path: str | None) -> None:
    if log_path is not None:  # the profiler behind MemoryTracker prints a line per session to stderr
        with open(log_path, "a") as log:
            os.dup2(log.fileno(), 2)
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    _warm_up()
    gc.freeze()  # torch's import-time objects: later collections need not scan them
    baseline = address_space_bytes()
    if limit_bytes is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = baseline + limit_bytes if hard == resource.RLIM_INFINITY else min(baseline + limit_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    conn.send("ready")
    while True:
        try:
            case = conn.recv()
        except EOFError:
            return
        if case is None:
            return
        try:
            result = case.run()
        except Exception as error:  # outside the case's own measurement, e.g. making its inputs under the cap
            result = dict(zip(("status", "message"), failure(error)))
        gc.collect()
        _malloc_trim()
        result["retained_bytes"] = address_space_bytes() - baseline
        conn.send(result)


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_methods(worker: IsolatedWorker | None, case: MethodsCase, empty: Callable[[], dict]) -> dict[str, dict]:
    """Measure ``case`` in ``worker`` (or in this process without one); return its methods' records.

    A case that failed as a whole (it raised, or its child died or timed out) gives every one of
    its ``case.methods`` its status and message, in records made by ``empty``.
    """
    try:
        result = worker.run(case) if worker is not None else case.run()
    except Exception as error:  # in this process: as the child reports it
        result = dict(zip(("status", "message"), failure(error)))
    if "methods" not in result:
        fate = {"status": result["status"], "message": result["message"]}
        result["methods"] = {m: {**empty(), **fate} for m in case.methods}
    return result["methods"]


class IsolatedWorker:
    """A child process that measures cases under an address-space cap (use as a context manager).

    Args:
        limit_bytes: Bytes of address space the child may add after warming up; ``None`` for no cap.
        timeout: Seconds one case may take before the child is killed. Default: 600.
        threads: ``torch.set_num_threads`` in the child. Default: ``None`` (torch's default).
        log_path: Append the child's stderr to this file. Default: ``None`` (inherit stderr).
    """

    def __init__(
        self, limit_bytes: int | None, timeout: float = 600.0, threads: int | None = None, log_path: str | None = None
    ) -> None:
        self.limit_bytes = limit_bytes
        self.timeout = timeout
        self.threads = threads
        self.log_path = log_path
        self._process: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None

    def __enter__(self) -> IsolatedWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        context = mp.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, self.limit_bytes, self.threads, self.log_path), daemon=True
        )
        self._process.start()
        child.close()
        self._conn = parent
        try:
            if not parent.poll(120):
                raise TimeoutError("no answer within 120 s")
            parent.recv()
        except (EOFError, OSError) as error:
            process = self._process
            self.close()
            raise RuntimeError(
                f"The measuring child process did not start ({type(error).__name__}, exit code "
                f"{process.exitcode}); its stderr says why."
            ) from None

    def run(self, case: Case | Measurable) -> dict:
        """Measure ``case`` in the child; a dead or hung child becomes a result, not an exception."""
        if self._process is None:
            self._start()
        assert self._conn is not None and self._process is not None
        start = time.perf_counter()
        try:
            self._conn.send(case)
            if self._conn.poll(self.timeout):
                result = self._conn.recv()
                if result["status"] != "ok" or result.get("retained_bytes", 0) > RETAINED_LIMIT:
                    self.close()  # a fresh child for the next case, with the full headroom
                return result
            outcome = ("timeout", f"no result after {self.timeout:g} s; the child process was killed")
        except (EOFError, ConnectionError, OSError):
            self._process.join(5)
            code = self._process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            outcome = ("crashed", f"the child process died ({how}) after {time.perf_counter() - start:.1f} s")
        self.close()
        return {"status": outcome[0], "message": outcome[1]}

    def close(self) -> None:
        """Stop the child (it is restarted by the next :meth:`run`)."""
        if self._process is None:
            return
        try:
            if self._process.is_alive() and self._conn is not None:
                self._conn.send(None)
                self._process.join(5)
        except (BrokenPipeError, OSError):
            pass
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None
