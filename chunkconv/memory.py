"""Measure the peak memory of a block of torch code: the tool that checks a budget is honoured.

``with MemoryTracker(device) as t: ...`` then ``t.peak`` is the most bytes allocated at once *above
what was allocated when the block began*, and ``t.current`` the net bytes still held at exit.

How it measures:

* **CUDA**: the caching allocator's own counters. On entry ``torch.cuda.reset_peak_memory_stats``
  and ``memory_allocated`` (the baseline); on exit ``max_memory_allocated`` and ``memory_allocated``
  minus the baseline. Exact, no overhead. ``current`` can be negative if the block frees tensors
  allocated before it. Resetting the peak statistics is visible to other code reading them.
* **CPU**: PyTorch's profiler in memory mode (``profile_memory=True``, CPU activity only, no
  shapes/stacks). c10's CPU allocator reports every allocation and free (pointer, size, time) to
  the profiler; the tracker replays them in time order, keeping a table of the blocks allocated
  inside the block, and takes the running maximum. This is a real allocator-level measurement:
  it sees every tensor any op allocates, including kernel-internal temporaries that never become
  a Python tensor (a ``TorchDispatchMode`` counting op outputs misses those: creating a 1000x500
  and a 500x500 float32 matrix, multiplying them and calling ``.sum().backward()``, it reports a
  6.0 MB peak where the allocator really peaks at 8.0 MB, a contiguous copy made inside the
  backward ``mm``) and everything autograd allocates in a ``backward()`` run inside the block.
  Frees of blocks allocated before the tracker started are ignored, so ``current`` is never
  negative on the CPU (on CUDA such frees lower the count, so a block that first frees old
  tensors can report a lower peak there than on the CPU).

Nesting: trackers may be nested (also across devices) as long as they exit in reverse order of
entry, which ``with`` guarantees. On CUDA the inner tracker's reset is folded into the outer
trackers' maxima first; on the CPU the profiler session is stopped, its events are replayed into
every active tracker, and a new session starts, so each tracker sees exactly its own block.

Threads: the trackers of one device are active in one thread at a time (the CPU's profiler has
one session per process: two at once crash it; CUDA's peak counter is one per device). A thread
entering a tracker while another thread has one active on the device *waits* until that
thread's last one exits; nesting in one thread never waits. So several threads can plan and
measure at once: they take turns, each measuring exactly its own block. The wait is unbounded
unless ``timeout`` says otherwise, and it deadlocks where the thread holding the trackers waits
for the waiting one (a tracker around a block that joins worker threads which measure, or plan
convolutions): pass ``timeout`` there and handle ``TimeoutError``. Trackers of two devices
entered in opposite orders by two threads can deadlock the same way.

Interrupts: every start, pause, resume and stop is exception-safe, ``KeyboardInterrupt``
included: whatever is interrupted, the profiler is stopped, stderr and c10's log level are
restored, and the next tracker works. A tracker whose measurement was cut short (its events were
lost, or reached some trackers only) raises ``RuntimeError`` from ``peak`` and ``current``
instead of reporting a wrong number; an exception raised by the block itself spoils nothing.
Python delivers an interrupt between any two bytecodes, so a second interrupt inside the cleanup
of the first can still leave the profiler on; the next tracker entered in that thread stops it.

Overhead (CPU): under 1 ms to enter; each op inside the block runs a few microseconds slower (the
profiler records it); exit costs roughly 10 us per allocation or free made in the block (the
profiler's post-processing plus the replay in Python): 0.6 s after 10,000 tiny ops that made
60,000 of them, milliseconds after a chunked convolution. Fine for measuring, too slow to leave on
in a training loop. Host memory: the profiler keeps a record of every op until the tracker exits,
and building the event tree at exit takes about 10 KB per op (1 GB after 80,000 tiny ops): a
block of millions of ops (a convolution run one patch per chunk over a large image, thousands of
training steps) can exhaust the machine. Measure one call or one step, not a loop.

Limits (CPU):

* Only allocations by c10's CPU allocator on the thread that entered the tracker (and threads
  PyTorch hands its thread-local state to, such as autograd's) are seen. Not seen: allocations on
  other threads (user threads, DataLoader workers, per-thread scratch inside some parallel
  kernels), memory outside the allocator (``torch.from_numpy``, oneDNN's own scratchpads,
  Python objects), and allocator overhead (malloc headers, page rounding); use process RSS for
  those.
* It uses the profiler, so no other ``torch.profiler`` session may run while a tracker is active
  (in any thread): entering under one raises ``RuntimeError``, and so does exiting a tracker
  whose block ran one (the numbers would be incomplete).
* Freeing, inside a tracker, a block allocated before the profiling started makes c10's CPU
  allocator log "Memory block of unknown size was allocated before the profiling started" (once
  per 1000 such frees; a garbage collection inside a planning probe does it). While CPU trackers
  are active, c10's log level (``TORCH_CPP_LOG_LEVEL``) is raised to errors so that users never
  see it, and restored when the last one exits: other c10 warnings (not Python warnings) from any
  thread are hidden meanwhile too. The level is found in torch's own ``lib/libc10`` (as in PyPI's
  wheels); where it is not, the harmless line may still appear.
* File descriptor 2 is pointed at ``/dev/null`` for the moment the profiler starts or stops (it
  prints a line each time), so other threads' stderr output in that moment is lost.
* It relies on the profiler's ``experimental_event_tree`` API (present in PyTorch 2.x); the
  tests in ``tests/test_memory.py`` pin the numbers it must produce.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch._C._autograd import _ProfilerResult
from torch._C._profiler import ProfilerActivity, ProfilerConfig, ProfilerState, _EventType, _ExperimentalConfig

from ._tracker_stack import _Backend, _Incomplete
from .budget import _resolve_device, format_bytes

__all__ = ["MemoryTracker"]


class MemoryTracker:
    """Context manager measuring the peak memory a block of torch code allocates on one device.

    Trackers of one device are active in one thread at a time: a tracker entered while another
    thread has one active waits until that thread's last tracker of the device exits (nesting in
    one thread never waits). So several threads may plan at once; they take turns measuring.

    Args:
        device: The CPU or a CUDA device to watch. Default: ``None`` (torch's default device,
            normally the CPU).
        timeout: The most seconds to wait for another thread's trackers of the device to exit;
            ``None`` waits as long as it takes. Set one where the other thread might be waiting
            for this one (a thread measuring a block that joins worker threads which measure):
            without it, both wait forever. Default: ``None``.

    Attributes:
        device: The watched device (a bare ``"cuda"`` resolved to the current CUDA device).

    Raises:
        ValueError: If ``device`` is neither a CPU nor an available CUDA device, or ``timeout``
            is negative.
        TypeError: If ``timeout`` is not a number.
        TimeoutError: On entering, if another thread kept its trackers active for ``timeout``
            seconds.

    Examples:
        >>> with MemoryTracker("cpu") as t:
        ...     x = torch.empty(1_000_000)  # 4 MB of float32
        ...     del x
        >>> 4_000_000 <= t.peak < 4_200_000, t.current
        (True, 0)

    """

    def __init__(self, device: torch.device | str | int | None = None, *, timeout: float | None = None) -> None:
        self.device = _resolve_device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"Invalid value for `device`; MemoryTracker watches 'cpu' and 'cuda' devices only, got {device=}."
            )
        self._timeout = _check_timeout(timeout)
        self._active = False
        self._peak: int | None = None
        self._current: int | None = None
        self._error: str | None = None

    def __enter__(self) -> MemoryTracker:
        if self._active:
            raise RuntimeError("This MemoryTracker is already active; nest a new MemoryTracker instead.")
        self._peak = self._current = self._error = None
        backend = _backend(self.device)
        try:
            backend.enter(self, self._timeout)
            self._active = True
        except BaseException:  # an interrupt just after entering: `with` will not call __exit__
            backend.abandon(self)
            self._active = False
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._error = "its measurement was cut short"  # until the backend returns the numbers
        try:
            self._peak, self._current = _backend(self.device).exit(self)
            self._error = None
        except _Incomplete as error:
            self._error = str(error)
            if exc is None:
                raise
            # The block's own exception goes on; ``peak`` and ``current`` say why they are unknown.
        finally:
            self._active = False

    @property
    def peak(self) -> int:
        """Most bytes allocated at once during the block, above the allocation at entry (>= 0)."""
        return self._result(self._peak, "peak")

    @property
    def current(self) -> int:
        """Net bytes the block still held allocated when it exited."""
        return self._result(self._current, "current")

    def _result(self, value: int | None, name: str) -> int:
        if value is None:
            if self._error is not None and not self._active:
                raise RuntimeError(f"MemoryTracker.{name} is unknown: {self._error}")
            state = "is still running" if self._active else "has not run yet"
            raise RuntimeError(f"MemoryTracker.{name} is known once its `with` block has exited; the block {state}.")
        return value

    def __repr__(self) -> str:
        if self._peak is None or self._current is None:
            return f"MemoryTracker(device='{self.device}')"
        return (
            f"MemoryTracker(device='{self.device}', peak={format_bytes(self._peak)}, "
            f"current={format_bytes(self._current)})"
        )


def _check_timeout(timeout: object) -> float | None:
    expected = "expected None or a number of seconds >= 0"
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"Invalid value for `timeout`; {expected}, got {timeout=}.")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"Invalid value for `timeout`; {expected}, got {timeout=}.")
    return None if math.isinf(timeout) else float(timeout)


@dataclass
class _CpuState:
    live: dict[int, int] = field(default_factory=dict)  # pointer -> bytes, for blocks allocated inside
    net: int = 0
    peak: int = 0
    broken: str | None = None  # why the measurement is incomplete (the profiler was stopped, an interrupt)

    def replay(self, events: list[tuple[int, int]]) -> None:
        live, net, peak = self.live, self.net, self.peak
        for ptr, nbytes in events:
            if nbytes > 0:
                net += nbytes - live.get(ptr, 0)
                live[ptr] = nbytes
                peak = max(peak, net)
            else:
                net -= live.pop(ptr, 0)  # a block allocated before this tracker began counts 0
        self.net, self.peak = net, peak


_PROFILER_STOPPED = (
    "The profiler session of a CPU MemoryTracker was stopped inside its block (by a torch.profiler run "
    "there?), so its measurement is incomplete. Do not profile inside a MemoryTracker on the CPU."
)
_INTERRUPTED = "measuring was interrupted while it paused, and the allocations it had recorded were lost"


class _CpuBackend(_Backend[_CpuState]):
    """CPU: replay the allocation events PyTorch's profiler records in memory mode.

    ``_on`` is set *before* the profiler is started and cleared only once it is known to be off,
    so whatever interrupts a start or a stop, the cleanup (and, failing that, the next tracker of
    the same thread) knows to check and stop it. The profiler session is thread-local, so only the
    thread that started it (``_on_thread``) can stop it.
    """

    _ACTIVITIES = {ProfilerActivity.CPU}

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self._on = False
        self._on_thread: int | None = None
        self._saved_log_level: int | None = None

    def _open(self) -> None:
        if self._on:  # a cleanup cut short by a second interrupt left the profiler (possibly) running
            if self._on_thread != threading.get_ident():
                raise RuntimeError(
                    "Cannot start a CPU MemoryTracker: an interrupted MemoryTracker in another thread may have "
                    "left its profiler session running; the next tracker entered in that thread stops it."
                )
            self._switch_off()
        if torch.autograd._profiler_enabled():
            raise RuntimeError(
                "Cannot start a CPU MemoryTracker while a torch profiler is running: the tracker "
                "measures with the profiler. Stop the profiler or measure outside it."
            )
        self._silence_c10_warnings()

    def _close(self) -> None:
        try:
            self._switch_off()
        finally:
            self._restore_c10_warnings()

    def _resume(self) -> None:
        if self._on and torch.autograd._profiler_enabled():  # still on: a pause was cut short before stopping it
            return
        config = ProfilerConfig(
            state=ProfilerState.KINETO,
            report_input_shapes=False,
            profile_memory=True,
            with_stack=False,
            with_flops=False,
            with_modules=False,
            experimental_config=_ExperimentalConfig(),
        )
        self._on, self._on_thread = True, threading.get_ident()
        # torch.autograd.profiler.profile does the same two calls; enabling without preparing crashes.
        with _quiet_stderr():
            torch.autograd._prepare_profiler(config, self._ACTIVITIES)
            torch.autograd._enable_profiler(config, self._ACTIVITIES)

    def _pause(self) -> None:
        if not self._on:  # not measuring (a resume failed before starting the profiler)
            return
        if not torch.autograd._profiler_enabled():  # a torch.profiler inside the block took over and stopped
            self._on = False
            self._break(_PROFILER_STOPPED)  # their _finish raises; a tracker nested now measures as usual
            return
        replayed = False
        try:
            with _quiet_stderr():
                result = torch.autograd._disable_profiler()
            self._on = False
            events = _cpu_allocations(result)
            for _, state in self._stack:
                state.replay(events)
            replayed = True
        finally:
            if not replayed:  # the session's events may be lost, or replayed into some trackers only
                self._break(_INTERRUPTED)

    def _switch_off(self) -> None:
        """Stop the profiler if this backend may have started it (its events are dropped).

        Tried twice, so that one interrupt (or error) in the middle of it still leaves it off.
        """
        if self._on_thread != threading.get_ident():
            return  # nothing this thread started; another thread's session is out of reach
        first: BaseException | None = None
        for _ in range(2):
            try:
                if self._on and torch.autograd._profiler_enabled():
                    with _quiet_stderr():
                        torch.autograd._disable_profiler()
                self._on = False
                break
            except BaseException as error:  # noqa: B036 - retried once, then re-raised below
                first = first or error
        if first is not None:
            raise first

    def _silence_c10_warnings(self) -> None:
        """Raise c10's log level to errors while trackers run (see the module docstring)."""
        level = _c10_log_level()
        if level is None or self._saved_log_level is not None:  # unavailable, or already raised
            return
        self._saved_log_level = level.value
        level.value = max(level.value, _C10_ERROR)

    def _restore_c10_warnings(self) -> None:
        level = _c10_log_level()
        if level is not None and self._saved_log_level is not None:
            level.value = self._saved_log_level
            self._saved_log_level = None

    def _begin(self) -> _CpuState:
        return _CpuState()

    def _finish(self, state: _CpuState) -> tuple[int, int]:
        if state.broken is not None:
            raise _Incomplete(state.broken)
        return state.peak, state.net

    def _mark(self, state: _CpuState, reason: str) -> None:
        state.broken = state.broken or reason


# c10's log severities are 0 info, 1 warning, 2 error, 3 fatal; it prints those >= its level.
_C10_ERROR = 2


@functools.cache
def _c10_log_level() -> ctypes.c_int | None:
    """c10's minimum log level, or ``None`` where this torch build does not export it.

    It is ``FLAGS_caffe2_log_level``, the flag ``TORCH_CPP_LOG_LEVEL`` sets at start-up.
    """
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libc10.so", "libc10.dylib", "c10.dll"):
        path = os.path.join(lib, name)
        if os.path.exists(path):
            try:
                return ctypes.c_int.in_dll(ctypes.CDLL(path), "FLAGS_caffe2_log_level")
            except (OSError, ValueError):
                return None
    return None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 briefly: the profiler's C++ side prints a line at every start and stop."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to silence
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)  # first: whatever interrupts this block, stderr comes back
        os.close(saved)


def _cpu_allocations(result: _ProfilerResult) -> list[tuple[int, int]]:
    """``(pointer, +bytes or -bytes)`` of every CPU allocation and free in a session, in time order."""
    found: list[tuple[int, int, int]] = []
    pending = result.experimental_event_tree()[::-1]
    while pending:  # pre-order walk, in the order the events were recorded
        event = pending.pop()
        if event.tag == _EventType.Allocation:
            fields: Any = event.extra_fields  # an allocation's fields (the union type does not narrow on tag)
            if fields.device.type == "cpu":
                found.append((event.start_time_ns, fields.ptr, fields.alloc_size))
        pending.extend(event.children[::-1])
    found.sort(key=lambda item: item[0])  # stable: (rare) equal timestamps keep the walk's order
    return [(ptr, nbytes) for _, ptr, nbytes in found]


@dataclass
class _CudaState:
    base: int
    peak: int
    broken: str | None = None


class _CudaBackend(_Backend[_CudaState]):
    """CUDA: the caching allocator's counters, relative to the allocation at entry."""

    def _pause(self) -> None:
        folded = False
        try:
            peak = torch.cuda.max_memory_allocated(self.device)
            for _, state in self._stack:
                state.peak = max(state.peak, peak)
            folded = True
        finally:
            if not folded:  # some trackers may lack the peak that the next reset erases
                self._break(_INTERRUPTED)

    def _resume(self) -> None:
        pass

    def _begin(self) -> _CudaState:
        torch.cuda.reset_peak_memory_stats(self.device)  # after _pause folded the old peak in
        base = torch.cuda.memory_allocated(self.device)
        return _CudaState(base=base, peak=base)

    def _finish(self, state: _CudaState) -> tuple[int, int]:
        if state.broken is not None:
            raise _Incomplete(state.broken)
        return state.peak - state.base, torch.cuda.memory_allocated(self.device) - state.base

    def _mark(self, state: _CudaState, reason: str) -> None:
        state.broken = state.broken or reason


_BACKENDS: dict[torch.device, _CpuBackend | _CudaBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def _backend(device: torch.device) -> _CpuBackend | _CudaBackend:
    with _BACKENDS_LOCK:
        if device not in _BACKENDS:
            _BACKENDS[device] = _CpuBackend(device) if device.type == "cpu" else _CudaBackend(device)
        return _BACKENDS[device]
