"""Choose the chunk size over the patch dimension that fits a memory budget: arithmetic only.

The planner sees shapes, dtypes, byte counts and measured per-chunk costs, never a tensor or a
module (as opt_einsum's path finders see only sizes and a memory limit), so it can be tested with
made-up costs. Its costs come from a :class:`CostSource` (in a real call
:class:`chunkconv.measure.ProbedCosts`, which runs the step on small probe batches). :func:`make_plan`
is four named steps: the fixed costs, the measured cost, the choice, and the frozen :class:`Plan`.

Memory model of one call (see ``docs/memory.md``)::

    forward peak  = output + padded input copy              (fixed)
                  + step_forward(chunk)                      (measured)
    backward peak = padded input + input-gradient buffers
                  + 2 x generator parameters (running gradient sums)       (fixed)
                  + on CUDA, a cuBLAS workspace for autograd's thread        (fixed)
                  + step_backward(chunk)                     (measured)

and the plan keeps ``SAFETY_FACTOR * peak + safety_bytes <= budget`` (on a CPU it also caps
chunks at ``CPU_CHUNK_BYTES``, which is faster there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from .budget import format_bytes
from .costs import ChunkCost, PathChoice
from .errors import BudgetTooSmallError
from .forms import FORM_CLASSES
from .geometry import ConvGeometry
from .streams import StreamSpec, default_streams

__all__ = [
    "CPU_CHUNK_BYTES",
    "CUDA_BACKWARD_WORKSPACE",
    "SAFETY_FACTOR",
    "CostSource",
    "PeakModel",
    "Plan",
    "PlanRequest",
    "choose_chunk_size",
    "fixed_costs",
    "make_plan",
    "safety_bytes",
]

# The plan keeps SAFETY_FACTOR * estimated peak + safety_bytes(device) within the budget. The
# factor covers what interpolation cannot see exactly (a BLAS picking another kernel at a larger
# size, index temporaries); the additive part covers allocator rounding: CUDA's caching allocator
# rounds every block up to 512 bytes and its statistics count the rounded sizes.
SAFETY_FACTOR = 1.10
_SAFETY_BYTES = {"cpu": 64 * 1024, "cuda": 2 * 2**20}
# On a CPU, chunks whose working set stays in cache are faster than one huge chunk: when the budget
# allows more, chunks are capped at this many bytes of per-chunk allocations (GPUs: no cap).
CPU_CHUNK_BYTES = 32 * 2**20  # 64 MiB before 2026-12-02: 32 was faster (CPU-A 0.82 vs 0.99 s) and leaner
# Autograd runs backward on its own thread per CUDA device, and cuBLAS gives that thread its own
# handle and workspace, taken from the caching allocator on its first matmul (PyTorch's defaults
# are 8 MiB and, on Hopper, 32 MiB; plus cuBLASLt's). The probes run on the calling thread and so
# never see it: the plan counts the largest default for every training call on CUDA. Not measured
# on a GPU yet; an allowance, not a measurement.
CUDA_BACKWARD_WORKSPACE = 33 * 2**20
# At most this many probes beyond the first measurement, to reach and verify the chosen chunk size.
_EXTENSIONS = 6


def safety_bytes(device: torch.device) -> int:
    """The additive safety margin for ``device`` (allocator rounding)."""
    return _SAFETY_BYTES.get(device.type, _SAFETY_BYTES["cuda"])


@dataclass(frozen=True)
class Plan:
    """What one call will do and what it will cost, computed from shapes alone.

    Attributes:
        geometry: shapes, padding and output size of the call.
        path: which path runs (fast or generic) and why.
        chunk_size: patches per chunk (the last chunk may be smaller).
        training: whether backward will run (forward and backward use the same chunks, so
            that recomputation replays the forward's random numbers exactly).
        budget: the budget in bytes, or ``None`` when ``chunk_size`` was given.
        budget_spec: the budget as the user wrote it.
        dtype: the input's dtype.
        device: the input's device.
        forward_peak: estimated peak bytes above the start of forward (``None`` when not estimated).
        backward_peak: estimated peak bytes above the start of backward (``None`` when not
            estimated, or no backward).
        fixed_forward: the chunk-independent allocations of forward, by name.
        fixed_backward: the chunk-independent allocations of backward, by name.
        cost: the measured per-chunk cost (``None`` when not measured).
        minimum_budget: the smallest budget this call fits in (one patch per chunk).
        unchunked_forward: what one chunk of all patches (the unchunked recipe) would need
            forward, from the same model.
        unchunked_training: the same for forward and backward (``None`` without backward).
        reason: why this chunk size.

    """

    geometry: ConvGeometry
    chunk_size: int
    training: bool
    dtype: torch.dtype
    device: torch.device
    path: PathChoice | None = None
    budget: int | None = None
    budget_spec: str = ""
    forward_peak: int | None = None
    backward_peak: int | None = None
    fixed_forward: dict[str, int] = field(default_factory=dict)
    fixed_backward: dict[str, int] = field(default_factory=dict)
    cost: ChunkCost | None = None
    minimum_budget: int | None = None
    unchunked_forward: int | None = None
    unchunked_training: int | None = None
    reason: str = ""
    kernel: str = "full"
    generated: int | None = None
    inputs: tuple[str, ...] = ("patches",)
    unbatched: bool = False  # the input had no batch dim (and the output has none): printed so
    sampling: str = ""

    @property
    def estimated_seconds(self) -> tuple[float, float | None] | None:
        """Rough seconds of forward and of backward: one chunk of the chosen size, timed without the memory
        tracker, scaled to every patch (``None`` if not timed: only plans asked for, and "auto" progress, time).
        """
        timing = self.cost.seconds_per_patch if self.cost is not None else None
        if timing is None:
            return None
        total = self.geometry.num_patches
        backward = timing[1] * total if self.training and timing[1] is not None else None
        return timing[0] * total, backward

    @property
    def num_chunks(self) -> int:
        """The number of chunks, ``ceil(num_patches / chunk_size)`` (0 for an empty input)."""
        return math.ceil(self.geometry.num_patches / self.chunk_size) if self.geometry.num_patches else 0

    def _kernel_text(self) -> str:
        made = FORM_CLASSES[self.kernel].describe(self.generated, self.geometry)
        if self.inputs != ("patches",):
            made += f"; the generator receives {', '.join(self.inputs)}"
        return made

    def __str__(self) -> str:
        g = self.geometry
        b = format_bytes
        mode = "training (forward, then backward recomputes each chunk)" if self.training else "inference"
        lead = () if self.unbatched else (g.batch,)
        shape_in, shape_out = (*lead, g.in_channels, *g.in_spatial), (*lead, g.out_channels, *g.out_spatial)
        chunks = (
            f"  chunks   {self.num_chunks:,} of {self.chunk_size:,} patches ({self.reason})"
            if self.num_chunks
            else f"  chunks   none ({self.reason}: nothing to compute)"
        )
        lines = [
            f"chunkconv plan: {mode}",
            f"  input    {shape_in} {str(self.dtype)[6:]} on {self.device} -> output {shape_out}",
            f"  patches  {g.num_patches:,} (N={g.batch} x L={g.locations_per_image:,}), {g.patch_size} features,"
            f" {self._kernel_text()}",
            chunks,
        ]
        if self.sampling:
            lines.append(f"  sampled  {self.sampling}")
        if self.path is not None:
            lines.append(f"  path     {self.path}")
        if self.budget is not None:
            lines.append(
                f"  budget   {b(self.budget)} (budget={self.budget_spec}); kept: "
                f"{SAFETY_FACTOR:.2f} x peak + {b(safety_bytes(self.device))} <= budget"
            )
        if self.forward_peak is not None:
            peaks = f"forward {b(self.forward_peak)}"
            if self.backward_peak is not None:
                peaks += f", backward {b(self.backward_peak)}"
            lines.append(f"  peak     {peaks} (estimated, above the allocation at the start of each)")
        for title, parts, step in (
            ("forward ", self.fixed_forward, self.cost.forward if self.cost else None),
            ("backward", self.fixed_backward if self.training else {}, self.cost.backward if self.cost else None),
        ):
            if not parts and step is None:
                continue
            items = [f"{name} {b(n)}" for name, n in parts.items() if n]
            if step is not None:
                items.append(
                    f"per chunk {b(step.at(self.chunk_size))} ({b(round(step.per_patch))}/patch + {b(step.intercept)})"
                )
            lines.append(f"  {title} " + ", ".join(items))
        if self.unchunked_forward is not None:
            text = f"forward {b(self.unchunked_forward)}"
            if self.unchunked_training is not None:
                text += f", training {b(self.unchunked_training)}"
            lines.append(f"  unchunked recipe (all {g.num_patches:,} weights at once) would need ~{text}")
        seconds = self.estimated_seconds
        if seconds is not None:
            text = f"forward ~{_seconds(seconds[0])}"
            if seconds[1] is not None:
                text += f", backward ~{_seconds(seconds[1])}"
            lines.append(
                f"  time     {text} (rough: one chunk of this size, timed without the memory tracker, times the chunks)"
            )
        if self.minimum_budget is not None:
            lines.append(f"  smallest feasible budget {b(self.minimum_budget)} (1 patch per chunk)")
        if self.cost is not None:
            lines.append(f"  generator cost {self.cost.describe()}")
        return "\n".join(lines)


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 0.95 else f"{s:.1f} s"


@dataclass(frozen=True)
class PlanRequest:
    """What the planner needs to know about one call: plain data.

    Attributes:
        geom, dtype, out_dtype, device, training, input_grad: the call's (see :class:`Plan`).
        path: which path runs (shown by the plan; ``None``: the generic path).
        budget: the budget in bytes (``None`` when ``chunk_size`` is given).
        budget_spec: the budget as the user wrote it.
        chunk_size: patches per chunk, overriding the budget.
        param_bytes: bytes of one running sum of the generator's parameter gradients.
        estimate: with ``chunk_size`` given, still measure to fill in the estimates.
        streams: the call's streams (:class:`~chunkconv.streams.StreamSpec`); default: the
            input's patches alone, with ``input_grad``.
        patch_layout: the layout the step reads the patches in (``"columns"``: chunks of whole
            output rows where that costs few chunks, so that most chunks are one block each).
        timed: time one chunk of the chosen size (for the time estimate) even without ``estimate``.
        unbatched: the input has no batch dim (the plan prints its shapes so).
        sampling: what the plan prints about a deformable call's offsets stream (``""``: none).

    """

    geom: ConvGeometry
    dtype: torch.dtype
    out_dtype: torch.dtype
    device: torch.device
    training: bool
    input_grad: bool
    path: PathChoice | None = None
    budget: int | None = None
    budget_spec: str = ""
    chunk_size: int | None = None
    param_bytes: int = 0
    estimate: bool = True
    streams: tuple[StreamSpec, ...] = ()
    kernel: str = "full"
    generated: int | None = None
    inputs: tuple[str, ...] = ("patches",)
    patch_layout: str = "rows"
    timed: bool = False
    unbatched: bool = False
    sampling: str = ""

    def streamed(self) -> tuple[StreamSpec, ...]:
        """The streams (see ``streams``)."""
        return self.streams or default_streams(self.geom, self.input_grad)


class CostSource(Protocol):
    """Where the planner gets measured costs from (:class:`chunkconv.measure.ProbedCosts`; tests fake it)."""

    def measure(self, limit: int | None) -> ChunkCost:
        """The step's cost at the probe sizes (probes predicted to exceed ``limit`` bytes skipped)."""

    def extend(self, cost: ChunkCost, patches: int) -> ChunkCost:
        """``cost`` with a measurement at ``patches`` added."""

    def reference(self, limit: int | None) -> ChunkCost | None:
        """The generic step's cost, for the unchunked estimate (``None``: the step is the generic one)."""


def fixed_costs(request: PlanRequest) -> tuple[dict[str, int], dict[str, int]]:
    """The chunk-independent allocations of forward and of backward, by name."""
    geom, device = request.geom, request.device
    item, out_item = request.dtype.itemsize, request.out_dtype.itemsize
    forward = {"output": geom.num_patches * geom.out_channels * out_item}
    backward: dict[str, int] = {}
    for spec in request.streamed():
        more_forward, more_backward = spec.kind.fixed_costs(spec, geom, item)
        forward.update(more_forward)
        backward.update(more_backward)
    backward["gradient accumulators"] = 2 * request.param_bytes
    backward["cuBLAS workspace of autograd's thread"] = CUDA_BACKWARD_WORKSPACE if device.type == "cuda" else 0
    return forward, backward


@dataclass(frozen=True)
class PeakModel:
    """Estimated peaks as a function of the chunk size: fixed costs plus the measured step."""

    fixed_forward: dict[str, int]
    fixed_backward: dict[str, int]
    cost: ChunkCost
    training: bool
    margin: int

    def peaks(self, patches: int) -> tuple[int, int | None]:
        """Estimated peak bytes of forward and of backward (``None`` without backward)."""
        forward = sum(self.fixed_forward.values()) + self.cost.forward.at(patches)
        backward = None
        if self.training and self.cost.backward is not None:
            backward = sum(self.fixed_backward.values()) + self.cost.backward.at(patches)
        return forward, backward

    def required(self, patches: int) -> int:
        """The smallest budget that holds chunks of ``patches``, margins included."""
        return math.ceil(SAFETY_FACTOR * max(p for p in self.peaks(patches) if p is not None)) + self.margin

    def per_patch(self) -> float:
        """Bytes per patch of the step's larger phase (for large chunks)."""
        backward = self.cost.backward.per_patch if self.training and self.cost.backward else 0.0
        return max(self.cost.forward.per_patch, backward)

    def bounded_size(self, budget: int) -> int:
        """The largest chunk that fits ``budget`` by a bound, not by extrapolating a fitted line.

        Beyond its largest probe a step's bytes per patch only fall (fixed part amortised; an
        affine cost ``a + s * B`` with ``a >= 0`` has ``cost(B) / B`` decreasing), so scaling the
        largest probe's bytes linearly bounds a larger chunk's. Safe where two tiny probes give a
        line of nearly no slope.
        """
        bound = math.inf
        phases = [(self.fixed_forward, self.cost.forward)]
        if self.training and self.cost.backward is not None:
            phases.append((self.fixed_backward, self.cost.backward))
        for fixed, step in phases:
            rows, used = step.points[-1]
            room = (budget - self.margin) / SAFETY_FACTOR - sum(fixed.values())
            if used > 0:
                bound = min(bound, room * rows / used)
        return max(0, int(bound)) if bound != math.inf else 2**62

    def binding_fixed(self) -> dict[str, int]:
        """The fixed costs of the phase that decides the smallest budget."""
        forward, backward = self.peaks(1)
        return self.fixed_backward if backward is not None and backward > forward else self.fixed_forward


def choose_chunk_size(
    model: PeakModel, total: int, budget: int, device: torch.device, row: int | None = None
) -> tuple[int, str]:
    """The largest chunk whose required budget fits, evened out over the chunks; and why.

    ``row``: the patches of one output row, if chunks should be whole rows (then every chunk
    starts at a row, and one inside an image is a single block); taken only where that shrinks
    the chunk by at most :data:`ROW_ALIGNED_LOSS`.
    """
    lo, hi = 1, total  # largest b with required(b) <= budget; required is non-decreasing in b
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if model.required(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    why = "all patches fit in one chunk" if lo == total else "largest chunks that fit the budget, evened out"
    if device.type == "cpu":
        cap = max(1, int(CPU_CHUNK_BYTES // max(model.per_patch(), 1.0)))
        if lo > cap:
            lo, why = cap, f"capped at {format_bytes(CPU_CHUNK_BYTES)} per chunk: faster in a CPU's caches"
    if row and lo < total and (lo // row) * row >= (1 - ROW_ALIGNED_LOSS) * lo:
        rows = total // row
        chunks = math.ceil(rows / (lo // row))
        return math.ceil(rows / chunks) * row, f"{why}, in whole rows"
    chunks = math.ceil(total / lo)
    return math.ceil(total / chunks), why  # same number of chunks, evenly sized: a lower peak


# Chunks of whole output rows (for the "columns" patch layout) are taken when they are at most this
# much smaller than the largest chunk that fits: a chunk of one block instead of three (a partial
# row, whole rows, a partial row) runs a third of the copies and per-tap adds of its patches.
ROW_ALIGNED_LOSS = 0.125


def _too_small(request: PlanRequest, model: PeakModel, minimum: int) -> BudgetTooSmallError:
    assert request.budget is not None
    fixed = model.binding_fixed()
    return BudgetTooSmallError(
        f"The budget {format_bytes(request.budget)} (budget={request.budget_spec}) is too small for this call even "
        f"with one patch per chunk: the smallest budget that fits is {format_bytes(minimum)} ({minimum} bytes), "
        f"of which fixed: {', '.join(f'{n} {format_bytes(v)}' for n, v in fixed.items() if v) or 'none'}. "
        "Raise the budget, or split the input; inspect the costs with `conv.plan(x)`.",
        budget=request.budget,
        minimum=minimum,
    )


def _unchunked(
    request: PlanRequest, fixed_forward: dict[str, int], fixed_backward: dict[str, int], reference: ChunkCost | None
) -> tuple[int | None, int | None]:
    """What one chunk of every patch, weights formed (the unchunked recipe), would need: forward, training."""
    if reference is None:
        return None, None
    total = request.geom.num_patches
    forward = sum(fixed_forward.values()) + reference.forward.at(total)
    training = None
    if request.training and reference.backward is not None:
        fixed = max(sum(fixed_forward.values()), sum(fixed_backward.values()))
        training = fixed + reference.backward.at(total)
    return forward, training


def _choose_verified(
    model: PeakModel, costs: CostSource, total: int, budget: int, device: torch.device, row: int | None = None
) -> tuple[int, str, PeakModel]:
    """The chosen chunk size, measured or bounded: a chunk beyond the largest probe is accepted only
    where :meth:`PeakModel.bounded_size` shows it fits; else the largest chunk that does is measured
    and the choice redone, so no probe risks more than the call it plans for (the first call included).
    """
    size, reason = choose_chunk_size(model, total, budget, device, row)
    for _ in range(_EXTENSIONS):
        probed, bounded = model.cost.forward.points[-1][0], model.bounded_size(budget)
        if size <= probed or size <= bounded or bounded <= probed:
            break
        model = replace(model, cost=costs.extend(model.cost, min(size, bounded)))
        size, reason = choose_chunk_size(model, total, budget, device, row)
    probed, bounded = model.cost.forward.points[-1][0], model.bounded_size(budget)
    if size > probed and size > bounded:  # neither measured nor bounded: keep to what is known to fit
        size, reason = max(probed, bounded), "largest chunks measured to fit the budget"
    return size, reason, model


def _timed(plan: Plan, costs: CostSource, size: int, request: PlanRequest) -> Plan:
    """``plan`` with its cost's seconds per patch, from one untracked chunk of ``size`` (where asked for
    and the cost source can time; a source that cannot leaves the plan without a time estimate).
    """
    timer = getattr(costs, "time", None)
    if plan.cost is None or timer is None or not (request.estimate or request.timed):
        return replace(plan, cost=plan.cost and replace(plan.cost, seconds_per_patch=None))
    return replace(plan, cost=replace(plan.cost, seconds_per_patch=timer(size)))


def make_plan(request: PlanRequest, costs: CostSource) -> Plan:
    """Plan one call: the largest chunk whose estimated peak fits the budget.

    Four steps: the fixed costs (arithmetic), the step's measured cost (from ``costs``), the
    choice (arithmetic, verified against ``costs`` beyond the probes), and the frozen :class:`Plan`.

    Raises:
        BudgetTooSmallError: not even one patch per chunk fits; the message names the smallest
            budget that does.

    """
    geom, total = request.geom, request.geom.num_patches
    base = Plan(
        geom,
        request.chunk_size or 1,
        request.training,
        request.dtype,
        request.device,
        path=request.path,
        budget_spec=request.budget_spec,
        kernel=request.kernel,
        generated=request.generated,
        inputs=request.inputs,
        unbatched=request.unbatched,
        sampling=request.sampling,
    )
    if request.chunk_size is not None and not request.estimate:
        return replace(base, reason="chunk_size given")
    if total == 0:
        return replace(base, reason="empty input")

    # 1. fixed costs; 2. the measured step
    fixed_forward, fixed_backward = fixed_costs(request)
    cost = costs.measure(request.budget)
    generic = request.path is None or request.path.path == "generic"
    reference = cost if generic else costs.reference(request.budget) if request.estimate else None
    model = PeakModel(fixed_forward, fixed_backward, cost, request.training, safety_bytes(request.device))
    unchunked_forward, unchunked_training = _unchunked(request, fixed_forward, fixed_backward, reference)
    base = replace(
        base,
        cost=cost,
        fixed_forward=fixed_forward,
        fixed_backward=fixed_backward,
        minimum_budget=model.required(1),
        unchunked_forward=unchunked_forward,
        unchunked_training=unchunked_training,
    )
    if request.chunk_size is not None:
        forward, backward = model.peaks(min(request.chunk_size, total))
        base = _timed(base, costs, min(request.chunk_size, total), request)
        return replace(base, forward_peak=forward, backward_peak=backward, reason="chunk_size given")

    # 3. the choice
    budget = request.budget
    assert budget is not None and base.minimum_budget is not None
    if budget < base.minimum_budget:
        raise _too_small(request, model, base.minimum_budget)
    row = geom.out_spatial[-1] if request.patch_layout == "columns" else None
    size, reason, model = _choose_verified(model, costs, total, budget, request.device, row)

    # 4. the plan
    forward, backward = model.peaks(size)
    base = _timed(replace(base, cost=model.cost), costs, size, request)
    return replace(
        base,
        chunk_size=size,
        budget=budget,
        forward_peak=forward,
        backward_peak=backward,
        reason=reason,
    )
