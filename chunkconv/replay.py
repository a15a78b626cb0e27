"""Random-number and autocast state: captured once, restored to recompute exactly what ran.

Recomputation is only faithful when a chunk sees the random stream and the autocast settings its
first run saw (``torch.utils.checkpoint`` keeps the same two). :class:`RngState` is the random
stream of one device (CPU, plus the CUDA device when the call runs there); the executor restores
it to retry a chunk that ran out of memory, the planner forks it so probing draws nothing from the
user's stream. :class:`ReplayState` adds the autocast state and runs a function under both, for
backward's recomputation.

The random stream is the process's, shared by every thread; a training call draws from it in
forward and restores it to replay those draws in backward. So that two threads training at once
each replay their own draws, everything chunkconv does with the stream (a training call's forward,
backward's replay, the planner's forked probes) runs under one re-entrant lock, :func:`rng_lock`:
such calls take turns, and each draws one unbroken run of the stream, as it would serially.
(Random numbers drawn by other code in another thread meanwhile still interleave; see
``docs/training.md``.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["ReplayState", "RngState", "forked_rng", "rng_lock"]

_T = TypeVar("_T")

_RNG_LOCK = threading.RLock()


def rng_lock() -> threading.RLock:
    """The lock under which chunkconv draws from, restores or forks the random stream (re-entrant)."""
    return _RNG_LOCK


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state and, for a CUDA ``device``, that device's."""

    device: torch.device
    cpu: Tensor
    cuda: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        """The RNG state of the CPU and of ``device``, now."""
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(device, torch.get_rng_state(), cuda)

    def restore(self) -> None:
        """Put the captured RNG state back."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def advanced(self) -> bool:
        """Whether random numbers were drawn since capture."""
        if self.cuda is not None and not torch.equal(torch.cuda.get_rng_state(self.device), self.cuda):
            return True
        return not torch.equal(torch.get_rng_state(), self.cpu)


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """A block whose random draws leave the caller's stream (CPU, and ``device``'s) as it was.

    Held under :func:`rng_lock`: restoring the stream on exit must not cut into another thread's draws.
    """
    devices = [device] if device.type == "cuda" else []
    with _RNG_LOCK, torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


@dataclass(frozen=True)
class ReplayState:
    """RNG and autocast state captured before forward, restored around recomputation."""

    rng: RngState
    autocast: tuple[tuple[str, bool, torch.dtype], ...]
    autocast_cache: bool

    @classmethod
    def capture(cls, device: torch.device) -> ReplayState:
        """The RNG and autocast state of a forward on ``device``, now."""
        kinds = sorted({device.type, "cpu"})
        autocast = tuple((k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds)
        return cls(RngState.capture(device), autocast, torch.is_autocast_cache_enabled())

    def replay(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` under the captured random stream and autocast state; the caller's stream is kept."""
        with forked_rng(self.rng.device), contextlib.ExitStack() as stack:
            self.rng.restore()
            for kind, enabled, dtype in self.autocast:
                stack.enter_context(
                    torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=self.autocast_cache)
                )
            return fn()
