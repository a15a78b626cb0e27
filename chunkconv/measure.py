"""Measure what one chunk step of the generator allocates; the planner turns it into chunk sizes.

The generator is arbitrary, so instead of assuming an MLP the real step of the path that will run
(gather, generator, contraction; and backward's recompute-and-differentiate) is run on a few small
probe batches under :class:`~chunkconv.memory.MemoryTracker`, giving bytes at those sizes
(:class:`~chunkconv.costs.StepCost`, interpolated piecewise linearly; the cost types live in
:mod:`.costs`, where the planner reads them without this module). Probes run on detached parameters, cloned
buffers and a forked random stream, so they change nothing the user owns. Measurements and plans
are cached per generator (weakly: dropping the generator drops them) and hold plain data only.
:class:`ProbedCosts` is what the planner asks for costs; the planner itself never runs a tensor.
"""

from __future__ import annotations

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
from .costs import ChunkCost, StepCost
from .errors import GeneratorOutputError
from .execute import BoundStep, ChunkStep, Executor, GeneratorStep
from .gather import ChunkIndex
from .geometry import ConvGeometry, conv_geometry
from .memory import MemoryTracker
from .replay import forked_rng
from .streams import StreamSpec, default_streams

__all__ = [
    "PROBE_ROWS",
    "CacheKey",
    "CallKey",
    "ChunkCost",
    "CostKey",
    "EffectsKey",
    "PlanKey",
    "ProbedCosts",
    "StepCost",
    "StepKey",
    "generator_cache",
    "generator_effects",
    "generator_state",
    "measure_step_cost",
    "probe_sizes",
    "probe_sources",
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


class _OutputBytes(TorchDispatchMode):
    """Upper bound of a block's allocations: the bytes of every new storage an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
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
    streams: tuple[StreamSpec, ...] = (),
) -> ChunkCost:
    """Run one real chunk step of ``step`` on probe batches of ``sizes`` patches; bytes at each.

    ``streams`` are the call's streams (default: the input's patches alone, needing a gradient
    when ``input_grad``); the probes run them through the call's own :class:`~.execute.Executor`.
    After the first two, a probe whose predicted cost exceeds ``limit`` bytes is skipped, so that
    probing never allocates much more than the budget it plans for. Forward hooks on the generator
    do see the probe calls.
    """
    specs = streams or default_streams(geom, input_grad)
    executor = Executor(step, geom, specs, out_dtype)
    grads = [s.requires_grad for s in specs for _ in range(s.arity)]
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
            run = executor.on(probe)
            sources = probe_sources(specs, probe, dtype, device)
            out_bytes = rows * geom.out_channels * out_dtype.itemsize

            def run_forward(sources: list[Tensor] = sources, run: Executor = run, rows: int = rows) -> object:
                return run.forward(sources, rows, bound=bound())

            with torch.no_grad():
                peak, method = _measure(device, run_forward)
            forward_points.append((rows, max(0, peak - out_bytes)))
            if training:
                grad_y = torch.randn((1, geom.out_channels, *probe.out_spatial), dtype=out_dtype, device=device)

                def run_backward(
                    sources: list[Tensor] = sources, run: Executor = run, rows: int = rows, grad_y: Tensor = grad_y
                ) -> object:
                    return run.backward(sources, grads, [(0, rows)], grad_y, bound=bound())

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
    streams: tuple[StreamSpec, ...] = (),
) -> tuple[float, float | None]:
    """Seconds per patch of one chunk of ``rows`` patches, forward and (when training) backward.

    Timed without the memory tracker (whose CPU form, a profiler, slows every op several times),
    after the plan chose ``rows``: the chunk the call will run, so that fixed costs per chunk are
    counted as often as they occur. Costs one chunk's work. ``streams`` as for
    :func:`measure_step_cost`.
    """
    probe = probe_geometry(geom, rows)
    run = Executor(step, probe, streams or default_streams(geom), out_dtype)
    grads = [s.requires_grad for s in run.specs for _ in range(s.arity)]
    params, buffers = _stand_ins(step)
    bound = step.bind(params, buffers) if params or buffers else step.bind(None)

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
        sources = probe_sources(run.specs, probe, dtype, device)
        forward = timed(lambda: run.forward(sources, rows, bound=bound), False)
        if not training:
            return forward, None
        grad_y = torch.randn((1, geom.out_channels, *probe.out_spatial), dtype=out_dtype, device=device)
        return forward, timed(lambda: run.backward(sources, grads, [(0, rows)], grad_y, bound=bound), True)


def probe_sources(
    specs: Sequence[StreamSpec], probe: ConvGeometry, dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """Random tensors for a probe's streams, each kind's on its own grid."""
    return [t for s in specs for t in s.kind.probe_sources(s, probe, dtype, device)]


def uses_untracked_grads(
    step: ChunkStep,
    geom: ConvGeometry,
    dtype: torch.dtype,
    device: torch.device,
    streams: tuple[StreamSpec, ...] = (),
) -> bool:
    """Whether the step's output needs a gradient although neither its rows nor its parameters do.

    Then the generator uses tensors chunkconv cannot see (a module's parameters that a plain
    function closes over, say): forward runs without a graph, so they would silently get no
    gradient. Runs the step once on two random rows, with the parameters detached.
    """
    return generator_effects(step, geom, dtype, device, streams)[0]


def generator_effects(
    step: ChunkStep,
    geom: ConvGeometry,
    dtype: torch.dtype,
    device: torch.device,
    streams: tuple[StreamSpec, ...] = (),
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
    executor = Executor(step, probe, streams or default_streams(geom))
    chunk = ChunkIndex.build(0, 2, probe)
    with forked_rng(device), torch.enable_grad():  # the random rows included: the caller's stream stays
        sources = probe_sources(executor.specs, probe, dtype, device)
        rows = tuple(s.gather(chunk) for s in executor.open(sources))
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


@dataclass(frozen=True)
class CallKey:
    """The shape-free part of a call: everything its step's measured cost depends on but the input size.

    Kept apart from the geometry (as einops caches a recipe apart from applying it), so that one
    measurement serves every input size.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    dtype: torch.dtype
    out_dtype: torch.dtype
    device: torch.device
    autocast: bool
    generator_state: tuple
    kernel: str
    kernel_groups: int
    inputs: tuple[str, ...]
    channels: tuple[int, ...]  # each stream's
    sampled: object = None  # a deformable call's first stream kind (offset groups, mask, rule, grads)


@dataclass(frozen=True)
class StepKey:
    """Which step runs: its type and the path choice that made it."""

    step: str
    path: str
    order: str | None
    backend: str | None


@dataclass(frozen=True)
class CostKey:
    """A cached :class:`ChunkCost`: the call, the step (``"generic"``: the reference step), the probes, the mode."""

    call: CallKey
    step: StepKey | str
    sizes: tuple[int, ...]
    training: bool
    grads: tuple[bool, ...]  # each stream's

    @property
    def forward(self) -> tuple[CallKey, StepKey | str, tuple[int, ...]]:
        """What its forward measurement depends on (forward is measured alike in every mode)."""
        return self.call, self.step, self.sizes


@dataclass(frozen=True)
class PlanKey:
    """A cached plan: the call, its mode, the step, the geometry and how the chunk size is chosen."""

    call: CallKey
    training: bool
    grads: tuple[bool, ...]
    step: StepKey
    geom: ConvGeometry
    budget: str | None  # as the user wrote it; None when chunk_size is given
    chunk_size: int | None
    estimate: bool
    timed: bool = False  # a chunk timed for the time estimate (see time_step)
    unbatched: bool = False  # printed shapes without the batch dim


@dataclass(frozen=True)
class EffectsKey:
    """A module generator's checked probe run (see :func:`generator_effects`): once per generator state and
    configuration of the probe (not per stride, autocast state or output dtype, which it does not depend on).
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    dtype: torch.dtype
    device: torch.device
    generator_state: tuple
    kernel: str
    inputs: tuple[str, ...]
    channels: tuple[int, ...]  # each stream's
    step: str
    training: bool
    allow_batch_coupled: bool
    sampled: object = None  # a deformable call's first stream kind, as in CallKey: its probe samples the patches


CacheKey = CostKey | PlanKey | EffectsKey

_CACHE_LIMIT = 64
_by_generator: weakref.WeakKeyDictionary[Any, dict[CacheKey, Any]] = weakref.WeakKeyDictionary()


def generator_cache(generator: object) -> dict[CacheKey, Any]:
    """The cache of costs and plans for ``generator`` (forgotten with it; none if not weak-referenceable)."""
    try:
        return _by_generator.setdefault(generator, {})
    except TypeError:  # not weak-referenceable: no caching
        return {}


def remember(cache: dict[CacheKey, Any], key: CacheKey, value: Any) -> Any:
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
        cache: dict[CacheKey, Any],
        key: CallKey,
        step_key: StepKey,
        streams: tuple[StreamSpec, ...] = (),
    ) -> None:
        self.step, self.geom, self.cache = step, geom, cache
        self.dtype, self.out_dtype, self.device = dtype, out_dtype, device
        self.training = training
        self.streams = streams or default_streams(geom)
        self.sizes = probe_sizes(device, geom.num_patches)
        grads = tuple(s.requires_grad for s in self.streams)
        self._key = CostKey(key, step_key, self.sizes, training, grads)
        self._reference_key = CostKey(key, "generic", self.sizes, training, grads)

    def _probe(self, step: ChunkStep, sizes: Sequence[int], limit: int | None) -> ChunkCost:
        return measure_step_cost(
            step,
            self.geom,
            dtype=self.dtype,
            out_dtype=self.out_dtype,
            device=self.device,
            training=self.training,
            input_grad=self.streams[0].requires_grad,
            sizes=sizes,
            limit=limit,
            streams=self.streams,
        )

    def _measured(self, step: ChunkStep, key: CostKey, limit: int | None) -> ChunkCost:
        found = self.cache.get(key)
        if found is None and not self.training and key == self._key:  # inference: a training measurement's forward
            forward = key.forward
            trained = next(
                (v for k, v in self.cache.items() if isinstance(k, CostKey) and k.forward == forward and k.training),
                None,
            )
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
