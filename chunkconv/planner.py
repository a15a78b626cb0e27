"""Choose the chunk size over the patch dimension that fits a memory budget.

The planner never touches the user's input. It works on a
:class:`~chunkconv.geometry.ConvGeometry`, dtypes and byte counts, plus one
measurement of the generator: the generator is arbitrary, so instead of
assuming an MLP the planner runs one real chunk step of the path that will run
(patch gather, generator, contraction; and the recompute-and-differentiate step
of backward) on a few small probe batches under
:class:`~chunkconv.memory.MemoryTracker`, interpolates the bytes piecewise
linearly, and measures the chosen chunk size too when it lies beyond the
probes. That measurement is cached per
generator and configuration, and plans are cached per input shape, so a
training loop pays for planning once.

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
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .budget import format_bytes, parse_budget
from .errors import BudgetTooSmallError
from .execute import BoundStep, ChunkStep, GeneratorStep, backward_chunks, buffer_copies, forward_chunks
from .fastpath import PathChoice
from .geometry import ConvGeometry, conv_geometry
from .memory import MemoryTracker

__all__ = [
    "CPU_CHUNK_BYTES",
    "SAFETY_FACTOR",
    "ChunkCost",
    "Plan",
    "StepCost",
    "check_chunk_size",
    "make_plan",
    "measure_chunk_cost",
    "probe_sizes",
    "safety_bytes",
]

Generator = Callable[[Tensor], Tensor]

# The plan keeps SAFETY_FACTOR * estimated peak + safety_bytes(device) within the budget. The
# factor covers what interpolation cannot see exactly (a BLAS picking another kernel at a larger
# size, index temporaries); the additive part covers allocator rounding: CUDA's caching allocator
# rounds every block up to 512 bytes and its statistics count the rounded sizes.
SAFETY_FACTOR = 1.10
_SAFETY_BYTES = {"cpu": 64 * 1024, "cuda": 2 * 2**20}
# Probe sizes (patches per probe chunk): large enough that per-patch costs dominate, small
# enough to be cheap. CUDA's allocator rounds small blocks, so probe it larger.
# The step's bytes are not one line (e.g. the end-of-call gradient chain dominates small chunks,
# the chunk's activations large ones), so they are measured at several sizes and interpolated
# piecewise linearly; beyond the largest probe the last segment's line holds. The first two
# probes are tiny, so that probing fits any budget the call itself fits (two rows, not one:
# a BatchNorm in training mode, if allowed, needs more than one row).
_PROBE_ROWS = {"cpu": (2, 4, 16, 64, 256, 1024), "cuda": (2, 8, 128, 512, 2048, 8192)}
# A probe is skipped when this many times the largest cost so far, scaled to its size, would
# exceed the budget: probing must not allocate more than the call it plans for.
_PROBE_HEADROOM = 1.5
# On a CPU, chunks whose working set stays in cache are faster than one huge chunk: when the budget
# allows more, chunks are capped at this many bytes of per-chunk allocations (GPUs: no cap).
CPU_CHUNK_BYTES = 64 * 2**20


def check_chunk_size(chunk_size: object) -> None:
    """Refuse a ``chunk_size`` that is neither ``None`` nor an int >= 1."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"Invalid value for `chunk_size`; expected an int >= 1 or None, got {chunk_size=}.")


def safety_bytes(device: torch.device) -> int:
    """The additive safety margin for ``device`` (allocator rounding)."""
    return _SAFETY_BYTES.get(device.type, _SAFETY_BYTES["cuda"])


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
        return self._lines()[-1][1]

    @property
    def intercept(self) -> int:
        return max(0, math.ceil(self._lines()[-1][0]))

    def at(self, patches: int) -> int:
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

    @property
    def num_chunks(self) -> int:
        """The number of chunks, ``ceil(num_patches / chunk_size)`` (0 for an empty input)."""
        return math.ceil(self.geometry.num_patches / self.chunk_size) if self.geometry.num_patches else 0

    def __str__(self) -> str:
        g = self.geometry
        b = format_bytes
        mode = "training (forward, then backward recomputes each chunk)" if self.training else "inference"
        lines = [
            f"chunkconv plan: {mode}",
            f"  input    ({g.batch}, {g.in_channels}, {', '.join(map(str, g.in_spatial))}) {str(self.dtype)[6:]}"
            f" on {self.device} -> output ({g.batch}, {g.out_channels}, {', '.join(map(str, g.out_spatial))})",
            f"  patches  {g.num_patches:,} (N={g.batch} x L={g.locations_per_image:,}), {g.patch_size} features,"
            f" weight {g.weight_numel:,} entries each",
            f"  chunks   {self.num_chunks:,} of {self.chunk_size:,} patches ({self.reason})",
        ]
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
                    f"per chunk {b(step.at(self.chunk_size))} "
                    f"({b(round(step.per_patch))}/patch + {b(step.intercept)})"
                )
            lines.append(f"  {title} " + ", ".join(items))
        if self.unchunked_forward is not None:
            text = f"forward {b(self.unchunked_forward)}"
            if self.unchunked_training is not None:
                text += f", training {b(self.unchunked_training)}"
            lines.append(f"  unchunked recipe (all {g.num_patches:,} weights at once) would need ~{text}")
        if self.minimum_budget is not None:
            lines.append(f"  smallest feasible budget {b(self.minimum_budget)} (1 patch per chunk)")
        if self.cost is not None:
            lines.append(f"  generator cost {self.cost.method}")
        return "\n".join(lines)


# -- measuring the generator -------------------------------------------------------------------


class _OutputBytes(TorchDispatchMode):
    """Upper bound of a block's allocations: the bytes of every new storage an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in self._seen:
                    self._seen.add(storage.data_ptr())
                    self.total += storage.nbytes()
        return out


def _measure(device: torch.device, fn: Callable[[], Any]) -> tuple[int, str]:
    try:
        with MemoryTracker(device) as tracker:
            fn()
        return tracker.peak, "measured by the allocator"
    except RuntimeError as error:  # e.g. a torch.profiler session is running (CPU tracker)
        if "profiler" not in str(error).lower():
            raise
    with _OutputBytes() as mode:
        fn()
    return mode.total, "bounded by summing op outputs (a profiler was running)"


def _probe_geometry(geom: ConvGeometry, rows: int) -> ConvGeometry:
    """One unpadded image with exactly ``rows`` output locations and ``geom``'s kernel."""
    receptive = [dil * (k - 1) + 1 for k, dil in zip(geom.kernel_size, geom.dilation)]
    spatial = [(rows - 1) * geom.stride[0] + receptive[0], *receptive[1:]]
    return conv_geometry(
        (1, geom.in_channels, *spatial),
        in_channels=geom.in_channels,
        out_channels=geom.out_channels,
        kernel_size=geom.kernel_size,
        stride=geom.stride,
        padding=(0,) * geom.ndim,
        dilation=geom.dilation,
        groups=geom.groups,
        padding_mode="zeros",
    )


def _merged(a: ChunkCost, b: ChunkCost) -> ChunkCost:
    """One cost from two sets of measurements of the same step."""

    def points(x: StepCost | None, y: StepCost | None) -> StepCost | None:
        if x is None or y is None:
            return None
        return StepCost(tuple(sorted(dict([*x.points, *y.points]).items())))

    forward = points(a.forward, b.forward)
    assert forward is not None
    return ChunkCost(forward, points(a.backward, b.backward), a.method)


def probe_sizes(device: torch.device, num_patches: int) -> tuple[int, ...]:
    """The probe batches for a call of ``num_patches``: never (much) larger than the call itself."""
    sizes = _PROBE_ROWS.get(device.type, _PROBE_ROWS["cuda"])
    return tuple(r for i, r in enumerate(sizes) if i < 2 or r <= num_patches)


def _stand_ins(generator: Generator) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Detached parameters and cloned buffers, so probing changes nothing the user owns."""
    if not isinstance(generator, nn.Module):
        return [], {}
    params = [p.detach().requires_grad_(p.requires_grad) for p in generator.parameters()]
    return params, buffer_copies(generator)


def measure_chunk_cost(
    step: ChunkStep,
    generator: Generator,
    geom: ConvGeometry,
    *,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    device: torch.device,
    training: bool,
    input_grad: bool,
    sizes: tuple[int, ...] | None = None,
    limit: int | None = None,
) -> ChunkCost:
    """Run one real chunk step of ``step`` (the path's arithmetic) on a few small probe batches and
    fit bytes per patch.

    ``sizes`` are the probe batches (default: :func:`probe_sizes` for ``geom``); after the first
    two, a probe whose predicted cost exceeds ``limit`` bytes is skipped, so that probing never
    allocates much more than the budget it plans for.

    The generator runs on random probe patches with detached parameters and cloned buffers,
    under a forked RNG: the user's parameters, buffers, hooks' targets and random stream are
    left as they were. Forward hooks on the generator do see the probe calls.
    """
    params, buffers = _stand_ins(generator)

    def bound() -> BoundStep:  # bound inside each measurement: binding may lay parameters out anew
        return step.bind(params, buffers) if params or buffers else step.bind(None)

    forward_points: list[tuple[int, int]] = []
    backward_points: list[tuple[int, int]] = []
    method = ""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        for rows in sizes or probe_sizes(device, geom.num_patches):
            if limit is not None and len(forward_points) >= 2:
                last_rows = forward_points[-1][0]
                largest = max(c for _, c in (*forward_points, *backward_points))
                if _PROBE_HEADROOM * largest * rows / last_rows > limit:
                    break
            probe = _probe_geometry(geom, rows)
            x = torch.randn((1, geom.in_channels, *probe.in_spatial), dtype=dtype, device=device)
            out_bytes = rows * geom.out_channels * out_dtype.itemsize
            with torch.no_grad():
                peak, method = _measure(
                    device, lambda x=x, probe=probe, rows=rows: forward_chunks(x, bound(), probe, rows, out_dtype)
                )
            forward_points.append((rows, max(0, peak - out_bytes)))
            if training:
                x.requires_grad_(input_grad)
                grad_y = torch.randn((1, geom.out_channels, *probe.out_spatial), dtype=out_dtype, device=device)
                with torch.enable_grad():
                    peak, _ = _measure(
                        device,
                        lambda x=x, probe=probe, rows=rows, grad_y=grad_y: backward_chunks(
                            x, bound(), probe, [(0, rows)], grad_y, input_grad=input_grad
                        ),
                    )
                grad_buffer = x.numel() * dtype.itemsize if input_grad else 0
                backward_points.append((rows, max(0, peak - grad_buffer)))
    return ChunkCost(
        forward=StepCost(tuple(forward_points)),
        backward=StepCost(tuple(backward_points)) if training else None,
        method=method,
    )


# -- caches ------------------------------------------------------------------------------------

_CACHE_LIMIT = 64
_by_generator: weakref.WeakKeyDictionary[Any, dict[tuple, Any]] = weakref.WeakKeyDictionary()


def _cache_for(generator: Generator) -> dict[tuple, Any]:
    try:
        return _by_generator.setdefault(generator, {})
    except TypeError:  # not weak-referenceable: no caching
        return {}


def _remember(cache: dict[tuple, Any], key: tuple, value: Any) -> Any:
    if len(cache) >= _CACHE_LIMIT:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def _generator_state(generator: Generator) -> tuple:
    if not isinstance(generator, nn.Module):
        return ()
    return (
        tuple(m.training for m in generator.modules()),
        tuple((p.shape, p.dtype, p.device, p.requires_grad) for p in generator.parameters()),
        tuple((b.shape, b.dtype, b.device) for b in generator.buffers()),
        tuple(bool(m._forward_hooks or m._forward_pre_hooks) for m in generator.modules()),
    )


# -- planning ----------------------------------------------------------------------------------


# Autograd runs backward on its own thread per CUDA device, and cuBLAS gives that thread its own
# handle and workspace, taken from the caching allocator on its first matmul (PyTorch's defaults
# are 8 MiB and, on Hopper, 32 MiB; plus cuBLASLt's). The probes run on the calling thread and so
# never see it: the plan counts the largest default for every training call on CUDA. Not measured
# on a GPU yet; an allowance, not a measurement.
CUDA_BACKWARD_WORKSPACE = 33 * 2**20


def _fixed_costs(
    geom: ConvGeometry,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    param_bytes: int,
    input_grad: bool,
    device: torch.device,
) -> tuple[dict[str, int], dict[str, int]]:
    item, out_item = dtype.itemsize, out_dtype.itemsize
    output = geom.num_patches * geom.out_channels * out_item
    padded = geom.batch * geom.in_channels * math.prod(geom.padded_spatial) * item
    unpadded = geom.batch * geom.in_channels * math.prod(geom.in_spatial) * item
    pad_copy = padded if geom.is_padded else 0
    forward = {"output": output, "padded input": pad_copy}
    backward = {
        "padded input": pad_copy,
        "input gradient (padded)": padded if input_grad else 0,
        "input gradient": unpadded if input_grad and geom.is_padded else 0,
        "gradient accumulators": 2 * param_bytes,
        "cuBLAS workspace of autograd's thread": CUDA_BACKWARD_WORKSPACE if device.type == "cuda" else 0,
    }
    return forward, backward


def make_plan(
    geom: ConvGeometry,
    *,
    generator: Generator,
    step: ChunkStep | None = None,
    path: PathChoice | None = None,
    dtype: torch.dtype,
    out_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    budget: str | int | float | None = "auto",
    chunk_size: int | None = None,
    training: bool = False,
    input_grad: bool = True,
    estimate: bool = True,
) -> Plan:
    """Plan one call: the largest chunk whose estimated peak fits the budget.

    Args:
        geom: the call's geometry.
        generator: the generator (measured once per configuration, see :func:`measure_chunk_cost`).
        step: the path's chunk arithmetic, measured by the probe. Default: the generic path's.
        path: which path runs and why (shown by the plan).
        dtype, out_dtype, device: of the input and of the output (autocast may differ).
        budget: anything :func:`chunkconv.budget.parse_budget` takes. Default: ``"auto"``.
        chunk_size: patches per chunk, overriding the budget (expert use: tests, benchmarks).
        training: whether backward will run; forward and backward then share one chunk size.
        input_grad: whether the input needs a gradient.
        estimate: with ``chunk_size`` given, still measure the generator to fill in the
            estimates (the functional path skips this; :func:`chunkconv.plan` does not).

    Raises:
        BudgetTooSmallError: not even one patch per chunk fits; the message names the smallest
            budget that does.

    """
    device = torch.device(device)
    out_dtype = out_dtype or dtype
    if step is None:
        names = tuple(n for n, _ in generator.named_parameters()) if isinstance(generator, nn.Module) else ()
        step = GeneratorStep(generator, names, geom)
    check_chunk_size(chunk_size)
    budget_spec = repr(budget)
    cache = _cache_for(generator)
    key = (
        geom.in_channels,
        geom.out_channels,
        geom.kernel_size,
        geom.stride,
        geom.dilation,
        geom.groups,
        dtype,
        out_dtype,
        device,
        training,
        input_grad,
        torch.is_autocast_enabled(device.type),
        _generator_state(generator),
        type(step).__name__,
        None if path is None else (path.path, path.order, path.backend),
    )
    plan_key = ("plan", key, geom, budget_spec if chunk_size is None else None, chunk_size, estimate)
    if plan_key in cache:
        return cache[plan_key]

    nbytes = parse_budget(budget, device) if chunk_size is None else None  # a bad budget fails before probing
    base = Plan(geom, chunk_size or 1, training, dtype, device, path=path, budget_spec=budget_spec)
    if chunk_size is not None and not estimate:
        return _remember(cache, plan_key, replace(base, reason="chunk_size given"))
    if geom.num_patches == 0:
        return _remember(cache, plan_key, replace(base, reason="empty input"))

    sizes = probe_sizes(device, geom.num_patches)

    def measured(kind: ChunkStep, cost_key: tuple) -> ChunkCost:
        found = cache.get(cost_key)
        if found is None:
            found = measure_chunk_cost(
                kind,
                generator,
                geom,
                dtype=dtype,
                out_dtype=out_dtype,
                device=device,
                training=training,
                input_grad=input_grad,
                sizes=sizes,
                limit=nbytes,
            )
            if len(found.forward.points) == len(sizes):  # not cut short by this budget: reusable
                _remember(cache, cost_key, found)
        return found

    cost = measured(step, ("cost", key, sizes))
    # "What the unchunked recipe would need": the generic step (weights formed) on all patches.
    # Only for plans made to be read (estimate=True): on the fast path it is an extra probe.
    reference_cost: ChunkCost | None = None
    if isinstance(step, GeneratorStep):
        reference_cost = cost
    elif estimate:
        names = tuple(n for n, _ in generator.named_parameters()) if isinstance(generator, nn.Module) else ()
        reference_cost = measured(GeneratorStep(generator, names, geom), ("cost", key[:-2], sizes, "generic"))
    module = generator if isinstance(generator, nn.Module) else None
    # over several chunks the previous and the new running sum coexist with a chunk's gradient:
    # two copies more than a single-chunk probe holds, accumulated in at least float32
    param_bytes = sum(p.numel() * max(4, p.element_size()) for p in module.parameters()) if module is not None else 0
    fixed_fwd, fixed_bwd = _fixed_costs(geom, dtype, out_dtype, param_bytes, input_grad, device)
    f_fwd, f_bwd = sum(fixed_fwd.values()), sum(fixed_bwd.values())

    def peaks(b: int) -> tuple[int, int | None]:
        forward = f_fwd + cost.forward.at(b)
        backward = f_bwd + cost.backward.at(b) if training and cost.backward else None
        return forward, backward

    margin = safety_bytes(device)

    def required(b: int) -> int:
        return math.ceil(SAFETY_FACTOR * max(p for p in peaks(b) if p is not None)) + margin

    total = geom.num_patches
    minimum = required(1)
    unchunked_fwd = f_fwd + reference_cost.forward.at(total) if reference_cost else None
    unchunked_train = (
        max(f_fwd, f_bwd) + reference_cost.backward.at(total)
        if reference_cost and training and reference_cost.backward
        else None
    )
    details = dict(
        cost=cost,
        fixed_forward=fixed_fwd,
        fixed_backward=fixed_bwd,
        minimum_budget=minimum,
        unchunked_forward=unchunked_fwd,
        unchunked_training=unchunked_train,
    )
    if chunk_size is not None:
        fwd, bwd = peaks(min(chunk_size, total))
        return _remember(
            cache, plan_key, replace(base, forward_peak=fwd, backward_peak=bwd, reason="chunk_size given", **details)
        )

    assert nbytes is not None
    if nbytes < minimum:
        fixed = fixed_bwd if training and f_bwd + cost.backward.at(1) > f_fwd + cost.forward.at(1) else fixed_fwd
        raise BudgetTooSmallError(
            f"The budget {format_bytes(nbytes)} (budget={budget_spec}) is too small for this call even with "
            f"one patch per chunk: the smallest budget that fits is {format_bytes(minimum)} ({minimum} bytes), "
            f"of which fixed: {', '.join(f'{n} {format_bytes(v)}' for n, v in fixed.items() if v) or 'none'}. "
            "Raise the budget, or split the input; inspect the costs with `conv.plan(x)`.",
            budget=nbytes,
            minimum=minimum,
        )
    def choose() -> tuple[int, str]:
        lo, hi = 1, total  # largest b with required(b) <= nbytes; required is non-decreasing in b
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if required(mid) <= nbytes:
                lo = mid
            else:
                hi = mid - 1
        why = "all patches fit in one chunk" if lo == total else "largest chunks that fit the budget, evened out"
        if device.type == "cpu":
            per_patch = max(cost.forward.per_patch, cost.backward.per_patch if training and cost.backward else 0.0)
            cap = max(1, int(CPU_CHUNK_BYTES // max(per_patch, 1.0)))
            if lo > cap:
                lo, why = cap, f"capped at {format_bytes(CPU_CHUNK_BYTES)} per chunk: faster in a CPU's caches"
        chunks = math.ceil(total / lo)
        return math.ceil(total / chunks), why  # same number of chunks, evenly sized: a lower peak

    size, reason = choose()
    for _ in range(2):  # a chunk beyond the largest probe is measured too, then the choice redone
        if size <= cost.forward.points[-1][0]:
            break
        extra = measure_chunk_cost(
            step, generator, geom, dtype=dtype, out_dtype=out_dtype, device=device,
            training=training, input_grad=input_grad, sizes=(size,),
        )  # fmt: skip
        cost = _remember(cache, ("cost", key, sizes), _merged(cost, extra))
        size, reason = choose()
    fwd, bwd = peaks(size)
    plan = replace(
        base, chunk_size=size, budget=nbytes, forward_peak=fwd, backward_peak=bwd, reason=reason,
        **{**details, "cost": cost},
    )  # fmt: skip
    return _remember(cache, plan_key, plan)
