"""Plain data the planner reads: the measured cost of a chunk step, and which path runs.

:class:`StepCost` and :class:`ChunkCost` are what the planner's probes measure (in
:mod:`.measure`, which runs the executor); :class:`PathChoice` is the fast path's decision (made
in :mod:`chunkconv.fast` from shapes and module structure). Both are frozen, hold no tensor and no
module, and import nothing but the standard library: the planner plans from them without seeing
the executor (the package's layering, documented in the README, keeps it so).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

__all__ = ["ORDERS", "ChunkCost", "Order", "PathChoice", "StepCost"]

Order = Literal["weights", "patch_first", "hidden_first"]
ORDERS: tuple[Order, ...] = ("weights", "patch_first", "hidden_first")


@dataclass(frozen=True)
class StepCost:
    """Bytes one chunk step allocates above what existed before it, measured at a few sizes.

    ``at(B)`` interpolates the measurements piecewise linearly (and extends the first and last
    segments); ``intercept + per_patch * B`` is the last segment's line, the one that holds for
    large chunks.
    """

    points: tuple[tuple[int, int], ...]  # (patches, bytes), increasing patches

    def _lines(self) -> list[tuple[float, float]]:
        lines = []
        for (r1, c1), (r2, c2) in zip(self.points, self.points[1:]):
            slope = max((c2 - c1) / (r2 - r1), 0.0)
            lines.append((c1 - slope * r1, slope))
        return lines

    @property
    def per_patch(self) -> float:
        """Bytes per patch of the last segment (the slope that holds for large chunks)."""
        return self._lines()[-1][1]

    @property
    def intercept(self) -> int:
        """The last segment's fixed bytes (its line at zero patches, at least 0)."""
        return max(0, math.ceil(self._lines()[-1][0]))

    def at(self, patches: int) -> int:
        """Bytes at ``patches`` patches, interpolated piecewise linearly."""
        lines = self._lines()
        segment = sum(1 for r, _ in self.points[1:-1] if patches > r)  # the segment patches falls in
        a, s = lines[min(segment, len(lines) - 1)]
        return max(0, math.ceil(a + s * patches))


@dataclass(frozen=True)
class ChunkCost:
    """The measured cost of one chunk step, forward and (when training) backward."""

    forward: StepCost
    backward: StepCost | None
    method: str  # how it was measured, shown in the plan
    measured_at: float = 0.0  # time.time() of the (last) measurement
    # seconds per patch of forward and backward of one untracked chunk of the chosen size (see measure.time_step)
    seconds_per_patch: tuple[float, float | None] | None = None

    def describe(self) -> str:
        """How and when it was measured, for the plan."""
        sizes = [r for r, _ in self.forward.points]
        when = time.strftime("%H:%M:%S", time.localtime(self.measured_at)) if self.measured_at else "?"
        return (
            f"{self.method}, on probes of {', '.join(map(str, sizes))} patches at {when} "
            "(once per generator state, dtype, device and kernel; reused for other input sizes)"
        )

    def merged(self, other: ChunkCost) -> ChunkCost:
        """One cost from two sets of measurements of the same step."""

        def points(x: StepCost | None, y: StepCost | None) -> StepCost | None:
            if x is None or y is None:
                return None
            return StepCost(tuple(sorted(dict([*x.points, *y.points]).items())))

        forward = points(self.forward, other.forward)
        assert forward is not None
        larger = other if other.forward.points[-1][0] > self.forward.points[-1][0] else self
        timing = larger.seconds_per_patch or self.seconds_per_patch
        return ChunkCost(forward, points(self.backward, other.backward), self.method, time.time(), timing)


@dataclass(frozen=True)
class PathChoice:
    """Which path runs and why; shown by :class:`~chunkconv.planner.Plan`. Plain data: no modules.

    Attributes:
        path: ``"fast"`` or ``"generic"``.
        reason: why, in words.
        order: the contraction order of the PyTorch backend (fast path only).
        hidden: the last Linear's ``in_features`` (fast path only).
        backend: ``"triton"`` (fused kernels) or ``"torch"`` (``order``'s GEMMs) (fast path only);
            see :mod:`chunkconv.fast.backends`.
        backend_reason: why Triton does not run, where it does not.

    """

    path: Literal["fast", "generic"]
    reason: str
    order: Order | None = None
    hidden: int | None = None
    backend: Literal["torch", "triton"] | None = None
    backend_reason: str | None = None

    def __str__(self) -> str:
        if self.path == "generic":
            return f"generic path ({self.reason})"
        if self.backend == "triton":
            how = "fused Triton kernels"
        else:
            why = f"; no Triton: {self.backend_reason}" if self.backend_reason else ""
            how = f"PyTorch, order {self.order}{why}"
        return f"fast path, {how} ({self.reason})"
