"""The stack of active memory trackers on one device, owned by one thread at a time.

:class:`~chunkconv.memory.MemoryTracker`'s bookkeeping apart from how a device measures: nested
entries and exits, threads taking turns, and every transition safe against exceptions and
interrupts. The CPU's and CUDA's ways of measuring subclass :class:`_Backend` in :mod:`.memory`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

if TYPE_CHECKING:
    from .memory import MemoryTracker

__all__: list[str] = []  # private to chunkconv.memory


class _Incomplete(RuntimeError):
    """A tracker's measurement missed part of its block; raised instead of returning a wrong number."""


_S = TypeVar("_S")


class _Backend(Generic[_S]):
    """The stack of active trackers on one device, owned by one thread at a time.

    A thread that enters a tracker while another thread owns the stack waits until the stack is
    empty and its owner has released it. Every transition (first entry, nested entry, exit) leaves
    the stack, the owner and the measuring machinery consistent on every path, exceptions and
    interrupts (``KeyboardInterrupt``) included: a tracker whose measurement was cut short is
    marked incomplete and raises instead of reporting a number.

    Subclasses say how to start measuring for the first tracker (``_open``) and stop after the last
    (``_close``), how to pause measuring (folding what was measured into every active tracker) and
    resume it, and how to begin and finish one tracker.
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
            if not self._stack:
                self._owner = me
                try:
                    self._open()
                    self._push(tracker)
                    self._resume()
                except BaseException:
                    self._stack.clear()
                    self._release()
                    raise
                return
            try:
                self._pause()
                self._push(tracker)
                self._resume()
            except BaseException:
                self._drop(tracker)
                self._resume_outer()
                raise

    def exit(self, tracker: MemoryTracker) -> tuple[int, int]:
        with self._turn:
            if not self._stack or self._stack[-1][0] is not tracker or self._owner != threading.get_ident():
                raise RuntimeError("MemoryTrackers must exit in the reverse order of entering, in the same thread.")
            try:
                self._pause()
            finally:  # leave a consistent stack (and measuring running for outer trackers) on every path
                _, state = self._stack.pop()
                if self._stack:
                    self._resume_outer()
                else:
                    self._release()
            return self._finish(state)

    def abandon(self, tracker: MemoryTracker) -> None:
        """Undo ``enter`` if it got as far as pushing ``tracker`` (an interrupt right after it)."""
        with self._turn:
            if self._stack and self._stack[-1][0] is tracker and self._owner == threading.get_ident():
                try:
                    self._pause()
                finally:
                    self._stack.pop()
                    if self._stack:
                        self._resume_outer()
                    else:
                        self._release()

    def _push(self, tracker: MemoryTracker) -> None:
        self._stack.append((tracker, self._begin()))

    def _drop(self, tracker: MemoryTracker) -> None:
        if self._stack and self._stack[-1][0] is tracker:
            self._stack.pop()

    def _resume_outer(self) -> None:
        """Measure again for the trackers still on the stack; if that fails, mark them incomplete."""
        try:
            self._resume()
        except BaseException:
            self._break("measuring could not be resumed after a nested MemoryTracker started or stopped")
            raise

    def _release(self) -> None:
        """The last tracker is gone: stop measuring and let other threads take their turn."""
        try:
            self._close()
        finally:
            self._owner = None
            self._turn.notify_all()

    def _break(self, reason: str) -> None:
        for _, state in self._stack:
            self._mark(state, reason)

    def _open(self) -> None:
        """Check that measuring can start and prepare for it; called when the first tracker enters."""

    def _close(self) -> None:
        """Undo ``_open`` and stop measuring; called when the last tracker exits or entering failed."""

    def _pause(self) -> None:
        raise NotImplementedError

    def _resume(self) -> None:
        raise NotImplementedError

    def _begin(self) -> _S:
        raise NotImplementedError

    def _finish(self, state: _S) -> tuple[int, int]:
        raise NotImplementedError

    def _mark(self, state: _S, reason: str) -> None:
        """Record that ``state`` missed part of its block, so ``_finish`` raises ``_Incomplete``."""
