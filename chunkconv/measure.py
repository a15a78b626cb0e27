"""Measure what one chunk step of the generator allocates; the planner turns it into chunk sizes.

The generator is arbitrary, so instead of assuming an MLP the real step of the path that will run
(gather, generator, contraction; and backward's recompute-and-differentiate) is run on a few small
probe batches under :class:`~chunkconv.memory.MemoryTracker`, giving bytes at those sizes
(:class:`StepCost`, interpolated piecewise linearly). Probes run on detached parameters, cloned
buffers and a forked random stream, so they change nothing the user owns. Measurements and plans
are cached per generator (weakly: dropping the generator drops them) and hold plain data only.
:class:`ProbedCosts` is what the planner asks for costs; the planner itself never runs a tensor.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .binding import buffer_copies
from .errors import GeneratorOutputError
from .execute import BoundStep, ChunkStep, GeneratorStep, backward_chunks, forward_chunks
from .gather import ChunkIndex, make_streams
from .geometry import ConvGeometry, conv_geometry
from .memory import MemoryTracker
from .replay import forked_rng

__all__ = [
    "PROBE_ROWS",
    "ChunkCost",
    "ProbedCosts",
    "StepCost",
    "generator_cache",
    "generator_effects",
    "generator_state",
    "measure_step_cost",
    "probe_sizes",
    "remember",
    "time_step",
    "uses_untracked_grads",
]

# Probe sizes (patches per probe chunk): large enough that per-patch costs dominate, small
# enough to be cheap. CUDA's allocator rounds small blocks, so probe it larger.
# The step's bytes are not one line (e.g. the end-of-call gradient chain dominates small chunks,
# the chunk's activations large ones), so they are measured at several sizes and interpolated
# piecewise linearly; beyond the largest probe the last segment's line holds. The first two
# probes are tiny, so that probing fits any budget the call itself fits (two rows, not one:
# a BatchNorm in training mode, if allowed, needs more than one row).
PROBE_ROWS = {"cpu": (2, 4, 16, 64, 256, 1024), "cuda": (2, 8, 128, 512, 2048, 8192)}
# A probe is skipped when this many times the largest cost so far, scaled to its size, would
# exceed the budget: probing must not allocate more than the call it plans for.
_PROBE_HEADROOM = 1.5


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
    measured_at: float = 0.0  # time.time() of the (last) measurement
    # seconds per patch of forward and backward of one untracked chunk of the chosen size (see time_step)
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


# Trackers of one device take turns between threads; a probe waits at most this long for another
# thread's (which might itself be waiting for this thread) before bounding the bytes instead.
_TRACKER_TIMEOUT = 5.0


def _measure(device: torch.device, fn: Callable[[], Any]) -> tuple[int, str]:
    try:
        with MemoryTracker(device, timeout=_TRACKER_TIMEOUT) as tracker:
            fn()
        return tracker.peak, MEASURED
    except TimeoutError:
        why = "another thread's MemoryTracker was active"
    except RuntimeError as error:  # e.g. a torch.profiler session is running (CPU tracker)
        if "profiler" not in str(error).lower():
            raise
        why = "a profiler was running"
    with _OutputBytes() as mode:
        fn()
    return mode.total, f"bounded by summing op outputs ({why}; not reused)"


MEASURED = "measured by the allocator"


def probe_geometry(geom: ConvGeometry, rows: int) -> ConvGeometry:
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


def probe_sizes(device: torch.device, num_patches: int) -> tuple[int, ...]:
    """The probe batches for a call of ``num_patches``: never (much) larger than the call itself."""
    sizes = PROBE_ROWS.get(device.type, PROBE_ROWS["cuda"])
    return tuple(r for i, r in enumerate(sizes) if i < 2 or r <= num_patches)


def _stand_ins(step: ChunkStep) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Detached parameters (the generator's, then the step's own) and cloned buffers: probing
    changes nothing the user owns.
    """
    generator = step.generator
    own = list(generator.parameters()) if isinstance(generator, nn.Module) else []
    params = [p.detach().requires_grad_(p.requires_grad) for p in (*own, *step.extras)]
    return params, buffer_copies(generator)


def measure_step_cost(
    step: ChunkStep,
    geom: ConvGeometry,
    *,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    device: torch.device,
    training: bool,
    input_grad: bool,
    sizes: Sequence[int],
    limit: int | None = None,
    streams: Sequence[str] = ("patches",),
    channels: Sequence[int] | None = None,
    source_grads: Sequence[bool] | None = None,
) -> ChunkCost:
    """Run one real chunk step of ``step`` on probe batches of ``sizes`` patches; bytes at each.

    ``streams`` are the kinds of per-location input the step reads (the patches first),
    ``channels`` the sourced ones' channel counts and ``source_grads`` which of them need a
    gradient (default: the input's, ``input_grad``). After the first two, a probe whose predicted
    cost exceeds ``limit`` bytes is skipped, so that probing never allocates much more than the
    budget it plans for. Forward hooks on the generator do see the probe calls.
    """
    channels = tuple(channels) if channels is not None else (geom.in_channels,)
    grads = tuple(source_grads) if source_grads is not None else (input_grad,)
    params, buffers = _stand_ins(step)

    def bound() -> BoundStep:  # bound inside each measurement: binding may lay parameters out anew
        return step.bind(params, buffers) if params or buffers else step.bind(None)

    forward_points: list[tuple[int, int]] = []
    backward_points: list[tuple[int, int]] = []
    method = ""
    with forked_rng(device):
        for rows in sizes:
            if limit is not None and len(forward_points) >= 2:
                last_rows = forward_points[-1][0]
                largest = max(c for _, c in (*forward_points, *backward_points))
                if _PROBE_HEADROOM * largest * rows / last_rows > limit:
                    break
            probe = probe_geometry(geom, rows)
            sources = _probe_sources(streams, channels, probe, dtype, device)
            out_bytes = rows * geom.out_channels * out_dtype.itemsize

            def run_forward(sources: list[Tensor] = sources, probe: ConvGeometry = probe, rows: int = rows) -> object:
                chunked = make_streams(streams, sources, probe, patch_layout=step.patch_layout)
                return forward_chunks(chunked, bound(), probe, rows, out_dtype, device)

            with torch.no_grad():
                peak, method = _measure(device, run_forward)
            forward_points.append((rows, max(0, peak - out_bytes)))
            if training:
                grad_y = torch.randn((1, geom.out_channels, *probe.out_spatial), dtype=out_dtype, device=device)

                def run_backward(
                    sources: list[Tensor] = sources,
                    probe: ConvGeometry = probe,
                    rows: int = rows,
                    grad_y: Tensor = grad_y,
                ) -> object:
                    chunked = make_streams(streams, sources, probe, grads, patch_layout=step.patch_layout)
                    return backward_chunks(chunked, bound(), probe, [(0, rows)], grad_y)

                with torch.enable_grad():
                    peak, _ = _measure(device, run_backward)
                # the gradient buffers are counted by the plan's fixed costs
                grad_buffer = sum(t.numel() * dtype.itemsize for t, g in zip(sources, grads) if g)
                backward_points.append((rows, max(0, peak - grad_buffer)))
    return ChunkCost(
        forward=StepCost(tuple(forward_points)),
        backward=StepCost(tuple(backward_points)) if training else None,
        method=method,
        measured_at=time.time(),
    )


def time_step(
    step: ChunkStep,
    geom: ConvGeometry,
    *,
    rows: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    device: torch.device,
    training: bool,
    streams: Sequence[str] = ("patches",),
    channels: Sequence[int] | None = None,
    source_grads: Sequence[bool] | None = None,
) -> tuple[float, float | None]:
    """Seconds per patch of one chunk of ``rows`` patches, forward and (when training) backward.

    Timed without the memory tracker (whose CPU form, a profiler, slows every op several times),
    after the plan chose ``rows``: the chunk the call will run, so that fixed costs per chunk are
    counted as often as they occur. Costs one chunk's work.
    """
    channels = tuple(channels) if channels is not None else (geom.in_channels,)
    grads = tuple(source_grads) if source_grads is not None else (False,) * len(channels)
    params, buffers = _stand_ins(step)
    bound = step.bind(params, buffers) if params or buffers else step.bind(None)
    probe = probe_geometry(geom, rows)

    def timed(fn: Callable[[], object], grad: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        with torch.set_grad_enabled(grad):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - started) / rows

    with forked_rng(device):
        sources = _probe_sources(streams, channels, probe, dtype, device)
        chunked = make_streams(streams, sources, probe, patch_layout=step.patch_layout)
        forward = timed(lambda: forward_chunks(chunked, bound, probe, rows, out_dtype, device), False)
        if not training:
            return forward, None
        grad_y = torch.randn((1, geom.out_channels, *probe.out_spatial), dtype=out_dtype, device=device)
        graded = make_streams(streams, sources, probe, grads, patch_layout=step.patch_layout)
        return forward, timed(lambda: backward_chunks(graded, bound, probe, [(0, rows)], grad_y), True)


def _probe_sources(
    streams: Sequence[str], channels: Sequence[int], probe: ConvGeometry, dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """Random tensors for a probe's sourced streams: input and guide over the input, features over the output."""
    kinds = [k for k in streams if k != "positions"]
    return [
        torch.randn((1, c, *(probe.out_spatial if k == "features" else probe.in_spatial)), dtype=dtype, device=device)
        for k, c in zip(kinds, channels)
    ]


def uses_untracked_grads(
    step: ChunkStep,
    geom: ConvGeometry,
    dtype: torch.dtype,
    device: torch.device,
    streams: Sequence[str] = ("patches",),
    channels: Sequence[int] | None = None,
) -> bool:
    """Whether the step's output needs a gradient although neither its rows nor its parameters do.

    Then the generator uses tensors chunkconv cannot see (a module's parameters that a plain
    function closes over, say): forward runs without a graph, so they would silently get no
    gradient. Runs the step once on two random rows, with the parameters detached.
    """
    return generator_effects(step, geom, dtype, device, streams, channels)[0]


def generator_effects(
    step: ChunkStep,
    geom: ConvGeometry,
    dtype: torch.dtype,
    device: torch.device,
    streams: Sequence[str] = ("patches",),
    channels: Sequence[int] | None = None,
) -> tuple[bool, tuple[str, ...]]:
    """What one run of the step on two random rows shows: ``(untracked, changed)``.

    ``untracked``: its output needs a gradient although neither its rows nor its parameters (detached
    stand-ins) do (see :func:`uses_untracked_grads`); ``changed``: the names of the generator's
    buffers that the run updated (on copies), i.e. its forward has state that changes per call.
    """
    params, buffers = _stand_ins(step)
    originals = dict(step.generator.named_buffers()) if isinstance(step.generator, nn.Module) else {}
    detached = [p.detach() for p in params]
    bound = step.bind(detached, buffers) if detached or buffers else step.bind(None)
    probe = probe_geometry(geom, 2)
    chunk = ChunkIndex.build(0, 2, probe)
    with forked_rng(device), torch.enable_grad():  # the random rows included: the caller's stream stays
        sources = _probe_sources(streams, channels or (geom.in_channels,), probe, dtype, device)
        rows = tuple(s.gather(chunk) for s in make_streams(streams, sources, probe, patch_layout=step.patch_layout))
        try:
            untracked = bool(bound(rows).requires_grad)
        except GeneratorOutputError:  # reported by the call itself, with its own chunk's shapes
            return False, ()
    changed = tuple(name for name, copy in buffers.items() if name in originals and not _same(copy, originals[name]))
    return untracked, changed


def _same(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
    return torch.equal(a, b)


# -- caches ------------------------------------------------------------------------------------

_CACHE_LIMIT = 64
_by_generator: weakref.WeakKeyDictionary[Any, dict[tuple, Any]] = weakref.WeakKeyDictionary()


def generator_cache(generator: object) -> dict[tuple, Any]:
    """The cache of costs and plans for ``generator`` (forgotten with it; none if not weak-referenceable)."""
    try:
        return _by_generator.setdefault(generator, {})
    except TypeError:  # not weak-referenceable: no caching
        return {}


def remember(cache: dict[tuple, Any], key: tuple, value: Any) -> Any:
    """Store ``value`` under ``key``, evicting the oldest entry beyond a few dozen."""
    if len(cache) >= _CACHE_LIMIT:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


# torch.nn modules whose forward ignores ``training``: switching them to eval() changes no cost.
_MODE_FREE = (
    nn.Linear,
    nn.Bilinear,
    nn.Identity,
    nn.Sequential,
    nn.Flatten,
    nn.Unflatten,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.activation.ReLU,
    nn.modules.activation.GELU,
    nn.modules.activation.Tanh,
    nn.modules.activation.Sigmoid,
    nn.modules.activation.SiLU,
    nn.modules.activation.LeakyReLU,
    nn.modules.activation.ELU,
    nn.modules.activation.Softplus,
    nn.modules.activation.Softmax,
    nn.modules.activation.Hardtanh,
    nn.modules.activation.Mish,
)


def generator_state(generator: object) -> tuple:
    """What about the generator changes its cost: modes, parameter and buffer layouts, hooks.

    The mode (``train()``/``eval()``) counts only for modules that may read it (dropout,
    normalisation with running statistics, any module of the user's own), so switching an MLP
    to ``eval()`` reuses its measurement.
    """
    if not isinstance(generator, nn.Module):
        return ()
    return (
        tuple(m.training for m in generator.modules() if type(m) not in _MODE_FREE),
        tuple((p.shape, p.dtype, p.device, p.requires_grad) for p in generator.parameters()),
        tuple((b.shape, b.dtype, b.device) for b in generator.buffers()),
        tuple(bool(m._forward_hooks or m._forward_pre_hooks) for m in generator.modules()),
    )


class ProbedCosts:
    """The planner's source of measured costs for one call's step (see :class:`~.planner.CostSource`).

    Measurements are cached in ``cache`` under ``key`` (the call's configuration without its
    input size) and ``step_key`` (which step), so a training loop measures once; a measurement
    cut short by a small budget is not cached.
    """

    def __init__(
        self,
        step: ChunkStep,
        geom: ConvGeometry,
        *,
        dtype: torch.dtype,
        out_dtype: torch.dtype,
        device: torch.device,
        training: bool,
        cache: dict[tuple, Any],
        key: tuple,
        step_key: tuple,
        streams: tuple[str, ...] = ("patches",),
        channels: tuple[int, ...] = (),
        source_grads: tuple[bool, ...] = (False,),
    ) -> None:
        self.step, self.geom, self.cache = step, geom, cache
        self.dtype, self.out_dtype, self.device = dtype, out_dtype, device
        self.training, self.source_grads = training, source_grads
        self.streams, self.channels = streams, channels or (geom.in_channels,)
        self.sizes = probe_sizes(device, geom.num_patches)
        self._key = ("cost", key, step_key, self.sizes, training, source_grads)
        self._reference_key = ("cost", key, "generic", self.sizes, training, source_grads)
        self._forward_key = ("cost", key, step_key, self.sizes)  # forward is measured alike in every mode

    def _probe(self, step: ChunkStep, sizes: Sequence[int], limit: int | None) -> ChunkCost:
        return measure_step_cost(
            step,
            self.geom,
            dtype=self.dtype,
            out_dtype=self.out_dtype,
            device=self.device,
            training=self.training,
            input_grad=self.source_grads[0],
            sizes=sizes,
            limit=limit,
            streams=self.streams,
            channels=self.channels,
            source_grads=self.source_grads,
        )

    def _measured(self, step: ChunkStep, key: tuple, limit: int | None) -> ChunkCost:
        found = self.cache.get(key)
        if found is None and not self.training and key == self._key:  # inference: a training measurement's forward
            trained = next((v for k, v in self.cache.items() if k[:4] == self._forward_key and k[4]), None)
            if trained is not None:
                timing = trained.seconds_per_patch
                found = ChunkCost(
                    trained.forward, None, trained.method, trained.measured_at, timing and (timing[0], None)
                )
        if found is None:
            found = self._probe(step, self.sizes, limit)
            if len(found.forward.points) == len(self.sizes) and found.method == MEASURED:  # complete, exact: reusable
                remember(self.cache, key, found)
        return found

    def measure(self, limit: int | None) -> ChunkCost:
        """The step's cost at the probe sizes (probes predicted to exceed ``limit`` bytes skipped)."""
        return self._measured(self.step, self._key, limit)

    def extend(self, cost: ChunkCost, patches: int) -> ChunkCost:
        """``cost`` with a measurement at ``patches`` added (a chunk beyond the largest probe)."""
        extra = self._probe(self.step, (patches,), None)
        return remember(self.cache, self._key, cost.merged(extra))

    def time(self, patches: int) -> tuple[float, float | None]:
        """Seconds per patch of one untracked chunk of ``patches`` (see :func:`time_step`)."""
        return time_step(
            self.step,
            self.geom,
            rows=patches,
            dtype=self.dtype,
            out_dtype=self.out_dtype,
            device=self.device,
            training=self.training,
            streams=self.streams,
            channels=self.channels,
            source_grads=self.source_grads,
        )

    def reference(self, limit: int | None) -> ChunkCost | None:
        """The generic step's cost (weights formed), for estimating the unchunked recipe.

        ``None`` when the step is the generic one: its own cost is the reference.
        """
        if isinstance(self.step, GeneratorStep):
            return None
        generator = self.step.generator
        names = tuple(n for n, _ in generator.named_parameters()) if isinstance(generator, nn.Module) else ()
        source = getattr(self.step, "source", 0)  # the fast path's generator input
        return self._measured(GeneratorStep(generator, names, self.geom, inputs=(source,)), self._reference_key, limit)
