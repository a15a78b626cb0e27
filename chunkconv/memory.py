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

Overhead (CPU): under 1 ms to enter; each op inside the block runs a few microseconds slower (the
profiler records it); exit costs roughly 10 us per allocation or free made in the block (the
profiler's post-processing plus the replay in Python): 0.6 s after 10,000 tiny ops that made
60,000 of them, milliseconds after a chunked convolution. Fine for measuring, too slow to leave on
in a training loop.

Limits (CPU):

* Only allocations by c10's CPU allocator on the thread that entered the tracker (and threads
  PyTorch hands its thread-local state to, such as autograd's) are seen. Not seen: allocations on
  other threads (user threads, DataLoader workers, per-thread scratch inside some parallel
  kernels), memory outside the allocator (``torch.from_numpy``, oneDNN's own scratchpads,
  Python objects), and allocator overhead (malloc headers, page rounding); use process RSS for
  those.
* It uses the profiler, so no other ``torch.profiler`` session may run while a tracker is active:
  entering under one raises ``RuntimeError``, and so does exiting a tracker whose block ran one
  (the numbers would be incomplete).
* The first free of a pre-existing block inside a tracker makes c10 print a one-time "Memory
  block of unknown size was allocated before the profiling started" warning; it is harmless.
* It relies on the profiler's ``experimental_event_tree`` API (present in PyTorch 2.x); the
  tests in ``tests/test_memory.py`` pin the numbers it must produce.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

import torch
from torch._C._autograd import _ProfilerResult
from torch._C._profiler import ProfilerActivity, ProfilerConfig, ProfilerState, _EventType, _ExperimentalConfig

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

    def __enter__(self) -> MemoryTracker:
        if self._active:
            raise RuntimeError("This MemoryTracker is already active; nest a new MemoryTracker instead.")
        self._peak = self._current = None
        _backend(self.device).enter(self, self._timeout)
        self._active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self._peak, self._current = _backend(self.device).exit(self)
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


_S = TypeVar("_S")


class _Backend(Generic[_S]):
    """The stack of active trackers on one device, owned by one thread at a time.

    A thread that enters a tracker while another thread owns the stack waits until the stack is
    empty and its owner has released it.

    Subclasses say how to pause measuring (folding what was measured into every active tracker),
    how to resume it, and how to begin and finish one tracker.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._turn = threading.Condition(threading.Lock())
        self._stack: list[tuple[MemoryTracker, _S]] = []
        self._owner: int | None = None

    def enter(self, tracker: MemoryTracker, timeout: float | None) -> None:
        me = threading.get_ident()
        with self._turn:
            if self._owner != me and not self._turn.wait_for(lambda: self._owner is None, timeout):
                raise TimeoutError(
                    f"Timed out after {timeout:g} s waiting for the MemoryTracker on {self.device} of another "
                    "thread; trackers of one device take turns between threads. Pass a longer `timeout` "
                    "(or None), or measure outside that thread's block."
                )
            if self._stack:
                self._pause()
            else:
                self._preflight()
                self._owner = me
            self._stack.append((tracker, self._begin()))
            try:
                self._resume()
            except BaseException:
                self._stack.pop()
                if not self._stack:
                    self._release()
                raise

    def exit(self, tracker: MemoryTracker) -> tuple[int, int]:
        with self._turn:
            if not self._stack or self._stack[-1][0] is not tracker or self._owner != threading.get_ident():
                raise RuntimeError("MemoryTrackers must exit in the reverse order of entering, in the same thread.")
            try:
                self._pause()
            finally:  # leave a consistent stack (and a running profiler for outer trackers) even on error
                _, state = self._stack.pop()
                if self._stack:
                    self._resume()
                else:
                    self._release()
            return self._finish(state)

    def _release(self) -> None:
        """The last tracker is gone: let other threads take their turn."""
        self._owner = None
        self._turn.notify_all()

    def _preflight(self) -> None:
        """Check that measuring can start; called when the first tracker enters."""

    def _pause(self) -> None:
        raise NotImplementedError

    def _resume(self) -> None:
        raise NotImplementedError

    def _begin(self) -> _S:
        raise NotImplementedError

    def _finish(self, state: _S) -> tuple[int, int]:
        raise NotImplementedError


@dataclass
class _CpuState:
    live: dict[int, int] = field(default_factory=dict)  # pointer -> bytes, for blocks allocated inside
    net: int = 0
    peak: int = 0
    broken: bool = False  # someone else stopped the profiler during this tracker's block

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


class _CpuBackend(_Backend[_CpuState]):
    """CPU: replay the allocation events PyTorch's profiler records in memory mode."""

    _ACTIVITIES = {ProfilerActivity.CPU}

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self._running = False

    def _preflight(self) -> None:
        if torch.autograd._profiler_enabled():
            raise RuntimeError(
                "Cannot start a CPU MemoryTracker while a torch profiler is running: the tracker "
                "measures with the profiler. Stop the profiler or measure outside it."
            )

    def _resume(self) -> None:
        config = ProfilerConfig(
            state=ProfilerState.KINETO,
            report_input_shapes=False,
            profile_memory=True,
            with_stack=False,
            with_flops=False,
            with_modules=False,
            experimental_config=_ExperimentalConfig(),
        )
        # torch.autograd.profiler.profile does the same two calls; enabling without preparing crashes.
        with _quiet_stderr():
            torch.autograd._prepare_profiler(config, self._ACTIVITIES)
            torch.autograd._enable_profiler(config, self._ACTIVITIES)
        self._running = True

    def _pause(self) -> None:
        if not self._running:
            return
        self._running = False
        if not torch.autograd._profiler_enabled():  # a torch.profiler inside the block took over and stopped
            for _, state in self._stack:
                state.broken = True
            raise RuntimeError(_PROFILER_STOPPED)
        with _quiet_stderr():
            result = torch.autograd._disable_profiler()
        events = _cpu_allocations(result)
        for _, state in self._stack:
            state.replay(events)

    def _begin(self) -> _CpuState:
        return _CpuState()

    def _finish(self, state: _CpuState) -> tuple[int, int]:
        if state.broken:
            raise RuntimeError(_PROFILER_STOPPED)
        return state.peak, state.net


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 briefly: the profiler's C++ side prints a line at every start and stop."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocations(result: _ProfilerResult) -> list[tuple[int, int]]:
    """``(pointer, +bytes or -bytes)`` of every CPU allocation and free in a session, in time order."""
    found: list[tuple[int, int, int]] = []
    pending = result.experimental_event_tree()[::-1]
    while pending:  # pre-order walk, in the order the events were recorded
        event = pending.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if fields.device.type == "cpu":
                found.append((event.start_time_ns, fields.ptr, fields.alloc_size))
        pending.extend(event.children[::-1])
    found.sort(key=lambda item: item[0])  # stable: (rare) equal timestamps keep the walk's order
    return [(ptr, nbytes) for _, ptr, nbytes in found]


@dataclass
class _CudaState:
    base: int
    peak: int


class _CudaBackend(_Backend[_CudaState]):
    """CUDA: the caching allocator's counters, relative to the allocation at entry."""

    def _pause(self) -> None:
        peak = torch.cuda.max_memory_allocated(self.device)
        for _, state in self._stack:
            state.peak = max(state.peak, peak)

    def _resume(self) -> None:
        pass

    def _begin(self) -> _CudaState:
        torch.cuda.reset_peak_memory_stats(self.device)  # after _pause folded the old peak in
        base = torch.cuda.memory_allocated(self.device)
        return _CudaState(base=base, peak=base)

    def _finish(self, state: _CudaState) -> tuple[int, int]:
        return state.peak - state.base, torch.cuda.memory_allocated(self.device) - state.base


_BACKENDS: dict[torch.device, _CpuBackend | _CudaBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def _backend(device: torch.device) -> _CpuBackend | _CudaBackend:
    with _BACKENDS_LOCK:
        if device not in _BACKENDS:
            _BACKENDS[device] = _CpuBackend(device) if device.type == "cpu" else _CudaBackend(device)
        return _BACKENDS[device]
