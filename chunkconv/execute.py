"""Stream a dynamic convolution chunk by chunk over the location dimension.

The executor owns the loop: for each chunk it gathers the rows of every per-location input
(the streams a call's :class:`~chunkconv.streams.StreamSpec` describe: the patches, and any side
input or positions the generator receives), hands them to the path's chunk arithmetic (a
:class:`ChunkStep`: :class:`GeneratorStep` here, the generator making every patch's weight; the
fast path's in :mod:`chunkconv.fast.step`) and writes the output rows; in backward it recomputes each
chunk and hands every stream its rows' gradients. A chunk that runs out of device memory is
retried in smaller pieces. Chunks are ranges of the flat ``N * L`` location index.

:class:`Executor` is the one driver: the autograd Function, the no-grad path and the planner's
probes all run a call through it, so that what the planner measures is what the call runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from .binding import bind_parameters
from .checks import autocast_compatible
from .errors import ChunkConvError, GeneratorCallError, GeneratorOutputError
from .forms import Full, KernelForm
from .gather import ChunkIndex, Stream, blockwise
from .geometry import ConvGeometry
from .replay import RngState
from .streams import StreamSpec, default_streams, make_streams

__all__ = [
    "BoundStep",
    "ChunkStep",
    "Executor",
    "GeneratorStep",
    "accumulation_dtype",
    "add_bias",
    "backward_chunks",
    "broadcast_bias",
    "call_generator",
    "check_output_dtype",
    "forward_chunks",
]


class BoundStep(Protocol):
    """One chunk's arithmetic, bound to the parameter tensors of one call.

    ``step(rows)`` maps a chunk's rows of every stream (``rows[0]``: the patches ``(B, P)``) to
    output rows ``(B, O)``; ``leaves`` are the tensors backward differentiates each chunk with
    respect to (besides the rows), and ``param_grads`` turns their summed gradients into
    gradients of the parameters, in order.
    """

    @property
    def leaves(self) -> Sequence[Tensor]:
        """The tensors backward differentiates each chunk with respect to, besides the rows."""

    def __call__(self, rows: Sequence[Tensor], *, values: bool = True) -> Tensor:
        """Output rows ``(B, O)`` of one chunk's rows of every stream.

        ``values=False``: backward's recompute, which reads only the graph; the kernel form may
        leave the output's values unset (:meth:`~chunkconv.forms.KernelForm.apply`).
        """

    def param_grads(self, leaf_grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """The parameters' gradients, in order, from the summed gradients of :attr:`leaves`."""


class ChunkStep(Protocol):
    """A path's chunk arithmetic; ``bind`` fixes the parameters of one call (see :class:`BoundStep`).

    ``bind(None)`` uses the generator's own parameters (forward); backward and the planner's
    probe pass detached stand-ins, in ``named_parameters()`` order, and copies of the buffers
    (so that recomputing a chunk does not update running statistics a second time).
    """

    @property
    def generator(self) -> Callable[[Tensor], Tensor]:
        """The user's generator."""

    @property
    def extras(self) -> tuple[Tensor, ...]:
        """The step's own parameters (the modulated form's static weight), bound after the generator's."""
        ...

    @property
    def patch_layout(self) -> str:
        """The memory layout it wants the patch rows in (:data:`chunkconv.gather.PATCH_LAYOUTS`)."""
        ...

    def bind(self, params: Sequence[Tensor] | None, buffers: dict[str, Tensor] | None = None) -> BoundStep:
        """The step bound to ``params`` and ``buffers`` (``None``: the generator's own)."""


@dataclass(frozen=True)
class GeneratorStep:
    """The generic path: the generator makes every location's kernel, then its form meets the patch.

    ``form`` is the kernel form (default: a full weight per location, see :mod:`.forms`);
    ``inputs`` are the positions in a chunk's rows of what the generator receives, in order
    (default: the patches, ``rows[0]``); ``static`` is the modulated form's static weight, which
    ``bind`` takes after the generator's parameters.
    """

    generator: Callable[[Tensor], Tensor]
    param_names: tuple[str, ...]
    geom: ConvGeometry
    form: KernelForm | None = None
    inputs: tuple[int, ...] = (0,)
    static: Tensor | None = None

    @property
    def extras(self) -> tuple[Tensor, ...]:
        """The modulated form's static weight, if any (bound after the generator's parameters)."""
        return () if self.static is None else (self.static,)

    @property
    def patch_layout(self) -> str:
        """``"columns"`` where they pay: a structured form whose generator does not take the patches
        (a generator receives contiguous rows); then only the form reads them.
        """
        columns = self.form is not None and self.form.COLUMNS
        return "columns" if columns and 0 not in self.inputs else "rows"

    def bind(self, params: Sequence[Tensor] | None, buffers: dict[str, Tensor] | None = None) -> BoundStep:
        """The step bound to ``params`` (the generator's, then the static weight) and ``buffers``."""
        form = self.form or Full(self.geom)
        layout = self.patch_layout
        if params is None:
            return _BoundGenerator(self.generator, (), self.geom, form, self.inputs, self.static, layout)
        n = len(self.param_names)
        tensors = {**dict(zip(self.param_names, params[:n])), **(buffers or {})}
        static = params[n] if len(params) > n else self.static
        return _BoundGenerator(
            bind_parameters(self.generator, tensors), tuple(params), self.geom, form, self.inputs, static, layout
        )


@dataclass(frozen=True)
class _BoundGenerator:
    generator: Callable[..., Tensor]
    params: tuple[Tensor, ...]
    geom: ConvGeometry
    form: KernelForm
    inputs: tuple[int, ...]
    static: Tensor | None
    layout: str = "rows"  # of the patch rows (chunkconv.gather.PATCH_LAYOUTS)

    @property
    def leaves(self) -> list[Tensor]:
        return [p for p in self.params if p.requires_grad]

    def __call__(self, rows: Sequence[Tensor], *, values: bool = True) -> Tensor:
        patches = rows[0]
        given = [rows[i] for i in self.inputs]
        out = call_generator(self.generator, given, "The generator", self.inputs)
        check_output_dtype(out, patches, "The generator")
        return self.form.apply(self.form.generated(out, given), patches, self.static, self.layout, values=values)

    def param_grads(self, leaf_grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        grads = iter(leaf_grads)
        return [next(grads) if p.requires_grad else None for p in self.params]


def call_generator(
    generator: Callable[..., Tensor], given: Sequence[Tensor], what: str, positions: Sequence[int] = (0,)
) -> Tensor:
    """``generator(*given)``, saying so when it raises or writes into its inputs.

    ``positions``: which of a chunk's streams each input is (0: the patches), for the message.

    Raises:
        GeneratorCallError: the generator raised (out of memory excepted: the executor retries that);
            the message names the inputs' shapes, the original is chained.
        GeneratorOutputError: the generator modified an input in place (backward could not replay it).

    """
    versions = [_version(t) for t in given]
    try:
        out = generator(*given)
    except (torch.OutOfMemoryError, ChunkConvError):
        raise
    except Exception as error:
        shapes = ", ".join(
            f"{'the patches' if i == 0 else f'stream {i}'} {tuple(t.shape)}" for i, t in zip(positions, given)
        )
        raise GeneratorCallError(
            f"{what} raised {type(error).__name__} when chunkconv called it on {given[0].shape[0] if given else 0} "
            f"rows, with {len(given)} input(s): {shapes} (one row per output location; the patches' features in "
            f"F.unfold order, in_channels * prod(kernel_size)). Its error: {error}"
        ) from error
    changed = [i for i, (t, v) in enumerate(zip(given, versions)) if _version(t) != v]
    if changed:
        raise GeneratorOutputError(
            f"{what} modified its input {changed[0]} in place (an in-place op such as p.mul_(2) on the rows "
            "chunkconv passed it): the rows are a view chunkconv reuses, and backward could not recompute the "
            "chunk. Use out-of-place ops (p = p * 2) on the generator's inputs."
        )
    return out


def _version(t: Tensor) -> int | None:
    return None if t.is_inference() else t._version  # inference tensors keep no version counter


def check_output_dtype(out: object, patches: Tensor, what: str) -> None:
    """Refuse an output on another device or in another dtype than the patches (unless autocast casts both anyway).

    Raises:
        GeneratorOutputError: naming the expected and the returned device or dtype.

    """
    if isinstance(out, Tensor) and out.device != patches.device:
        raise GeneratorOutputError(
            f"{what} must return its output on the device of its input: expected {patches.device}, "
            f"got {out.device}. Move the generator (and whatever it creates tensors with) to {patches.device}."
        )
    if not isinstance(out, Tensor) or autocast_compatible(out.dtype, patches.dtype, patches.device):
        return
    raise GeneratorOutputError(
        f"{what} must return the dtype of its input: expected {patches.dtype} (the input's, or autocast's), "
        f"got {out.dtype}. Convert the generator with .to({patches.dtype}) or cast its output."
    )


def broadcast_bias(bias: Tensor, ndim: int) -> Tensor:
    """``bias`` ``(O,)`` as ``(1, O, 1, ...)``, to add to an output with ``ndim`` spatial dims."""
    return bias.view(1, -1, *([1] * ndim))


def add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    """``y`` ``(N, O, *spatial)`` plus ``bias``, in ``y``'s dtype, in place (a result no graph holds)."""
    if bias is not None:
        y += broadcast_bias(bias, y.dim() - 2).to(y.dtype)
    return y


def _output_rows(y: Tensor, geom: ConvGeometry) -> Tensor:
    """``y`` as ``(N, L, O)`` so that a chunk's ``(B, O)`` rows index into it.

    A view for contiguous, channels-last and expanded tensors (the output, and the usual
    upstream gradients); any other layout is copied once (``reshape``).
    """
    return y.reshape(geom.batch, geom.out_channels, geom.locations_per_image).transpose(1, 2)


def _warn_oom_once(start: int, end: int, size: int) -> None:
    global _oom_warned
    if not _oom_warned:
        _oom_warned = True
        warnings.warn(
            f"chunkconv: out of memory in the chunk of patches [{start}, {end}) although the plan fitted "
            f"the budget (another process or tensor took memory?); retrying it in chunks of {size}. "
            "Results are unchanged. Lower the budget to avoid the retries. (Warned once per process.)",
            RuntimeWarning,
            stacklevel=4,
        )


_oom_warned = False


def forward_chunks(
    streams: Sequence[Stream],
    step: BoundStep,
    geom: ConvGeometry,
    chunk_size: int,
    out_dtype: torch.dtype,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, list[tuple[int, int]]]:
    """The output ``(N, O, *out_spatial)`` without bias, and the chunk ranges actually used.

    If a chunk runs out of device memory (``torch.OutOfMemoryError``), the chunk size is halved
    and the failed chunk retried from the random state it started with (so the draws a generator
    makes are those backward will replay); nothing computed before is lost. Backward must replay
    the same ranges, so they are returned.
    """
    y = torch.empty((geom.batch, geom.out_channels, *geom.out_spatial), dtype=out_dtype, device=device)
    out_rows = _output_rows(y, geom)
    used: list[tuple[int, int]] = []
    start, size, total = 0, chunk_size, geom.num_patches
    while start < total:
        end = min(start + size, total)
        rng = RngState.capture(device)
        try:
            chunk = ChunkIndex.build(start, end, geom)
            out = step(tuple(s.gather(chunk) for s in streams))
            blockwise(out_rows, chunk.rows, out.to(out_dtype), "write")
            del out  # before the next chunk's rows are gathered: one chunk's working set at a time
        except torch.OutOfMemoryError:
            if end - start == 1:
                raise
            rng.restore()
            size = (end - start) // 2
            _warn_oom_once(start, end, size)
            continue
        used.append((start, end))
        if progress is not None:
            progress(end - start)
        start = end
    return y, used


def backward_chunks(
    streams: Sequence[Stream],
    step: BoundStep,
    geom: ConvGeometry,
    ranges: Sequence[tuple[int, int]],
    grad_y: Tensor,
    *,
    splittable: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Recompute every chunk; return the gradients of the streams' sources and of the step's parameters.

    Must run with grad mode enabled and with the RNG and autocast state of the forward
    restored by the caller, replaying the forward's chunk ``ranges`` so that each chunk is
    recomputed exactly. Parameter gradients are summed over chunks; each stream that wants a
    gradient receives its rows' gradients chunk by chunk. A chunk that runs out of device memory
    is split in two and retried when ``splittable`` (the generator draws no random numbers, so
    smaller chunks recompute the same values). The parameter gradients are summed in at least
    float32 (:func:`accumulation_dtype`) and cast back at the end, so that a half-precision call
    does not lose accuracy as the number of chunks grows. Input gradients are accumulated in the
    input's dtype: each of its elements receives at most ``prod(kernel_size)`` patch gradients
    whatever the chunking, so a float32 buffer (twice the memory of the largest buffer, for half
    inputs) would buy little.
    """
    wanted = list(step.leaves)
    graded = [i for i, s in enumerate(streams) if s.requires_grad]
    if not (graded or wanted):
        return [None] * len(streams), step.param_grads([None] * len(wanted))
    grad_rows = _output_rows(grad_y, geom)
    param_grads: list[Tensor | None] = [None] * len(wanted)
    pending = list(reversed(ranges))
    while pending:
        start, end = pending.pop()
        try:
            chunk = ChunkIndex.build(start, end, geom)
            rows = tuple(s.gather(chunk).requires_grad_(s.requires_grad) for s in streams)
            out = step(rows, values=False)  # differentiated, never read
            targets = [rows[i] for i in graded] + wanted
            upstream = torch.empty_like(out)  # in out's layout (and dtype): its backward reads it directly
            blockwise(grad_rows, chunk.rows, upstream, "read")  # copy_ casts to out's dtype
            grads = torch.autograd.grad(out, targets, upstream, allow_unused=True)
            del out, rows, targets, upstream  # free this chunk's graph before the next is built
        except torch.OutOfMemoryError:
            if not splittable or end - start == 1:
                raise
            mid = (start + end) // 2
            _warn_oom_once(start, end, mid - start)
            pending += [(mid, end), (start, mid)]
            continue
        _deliver(streams, graded, chunk, grads, param_grads)
        del grads
        if progress is not None:
            progress(end - start)
    source_grads = [s.grad() if s.requires_grad else None for s in streams]
    if not ranges:  # no location at all (an empty batch): zero gradients, as torch's convolutions give
        param_grads = [torch.zeros_like(leaf, dtype=accumulation_dtype(leaf.dtype)) for leaf in wanted]
    # back to each leaf's dtype (the sums ran in float32 for half-precision leaves)
    summed = [None if g is None else g.to(leaf.dtype) for g, leaf in zip(param_grads, wanted)]
    return source_grads, step.param_grads(summed)


def _deliver(
    streams: Sequence[Stream],
    graded: Sequence[int],
    chunk: ChunkIndex,
    grads: Sequence[Tensor | None],
    param_grads: list[Tensor | None],
) -> None:
    """Hand the rows' gradients to their streams and add the parameters' to the running sums."""
    for i, g in zip(graded, grads):
        if g is not None:
            streams[i].add_grad(chunk, g)
    for i, g in enumerate(grads[len(graded) :]):
        if g is None:
            continue
        accumulated = param_grads[i]
        if accumulated is None:
            param_grads[i] = g.to(accumulation_dtype(g.dtype), copy=True)
        else:
            accumulated.add_(g)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype sums over chunks run in: ``dtype``, but at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class Executor:
    """One call's chunk loop: a step, the geometry it runs on and the streams it reads.

    ``forward`` and ``backward`` open the streams over the call's source tensors (in
    :func:`chunkconv.streams.stream_sources` order) and run :func:`forward_chunks` /
    :func:`backward_chunks`; the autograd Function, the no-grad path and the planner's probes
    (on a probe's geometry, :meth:`on`) all go through them.
    """

    step: ChunkStep
    geom: ConvGeometry
    streams: tuple[StreamSpec, ...] = ()
    out_dtype: torch.dtype | None = None

    def on(self, geom: ConvGeometry) -> Executor:
        """The same call on another geometry (a probe's)."""
        return replace(self, geom=geom)

    @property
    def specs(self) -> tuple[StreamSpec, ...]:
        """The streams, the input's patches alone by default."""
        return self.streams or default_streams(self.geom)

    @property
    def num_sources(self) -> int:
        """How many source tensors the streams read."""
        return sum(s.arity for s in self.specs)

    def open(self, sources: Sequence[Tensor], grads: Sequence[bool] | None = None) -> list[Stream]:
        """The streams over ``sources`` (``grads``: per source, whether backward wants its gradient)."""
        return make_streams(self.specs, sources, self.geom, grads, patch_layout=self.step.patch_layout)

    def forward(
        self,
        sources: Sequence[Tensor],
        chunk_size: int,
        *,
        bound: BoundStep | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """The output without bias and the chunk ranges used (``bound``: default the generator's own parameters)."""
        out_dtype = self.out_dtype or sources[0].dtype
        step = bound if bound is not None else self.step.bind(None)
        return forward_chunks(self.open(sources), step, self.geom, chunk_size, out_dtype, sources[0].device, progress)

    def backward(
        self,
        sources: Sequence[Tensor],
        grads: Sequence[bool],
        ranges: Sequence[tuple[int, int]],
        grad_y: Tensor,
        *,
        bound: BoundStep,
        splittable: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Recompute the forward's ``ranges``; the gradients of the sources (one per source) and of the parameters."""
        streams = self.open(sources, grads)
        stream_grads, param_grads = backward_chunks(
            streams, bound, self.geom, ranges, grad_y, splittable=splittable, progress=progress
        )
        source_grads = [g for spec, sg in zip(self.specs, stream_grads) for g in spec.kind.split_grad(sg)]
        return source_grads, param_grads
