"""Stream a dynamic convolution chunk by chunk over the patch dimension.

The executor owns the tensor work: padding the input once, gathering the
patches of a chunk straight from a strided view of the padded input (the whole
unfold never exists), running the path's chunk arithmetic on them (a
:class:`ChunkStep`: :class:`GeneratorStep` here, the generator making every
patch's weight; the fast path's in :mod:`.fast_execute`), writing the rows of
the output, and, in backward, recomputing each chunk and scattering its patch
gradients back. Chunks are ranges of the flat ``N * L`` patch index,
so a chunk may span several images and no size has to divide another.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import GeneratorOutputError
from .geometry import ConvGeometry

__all__ = [
    "BoundStep",
    "ChunkIndex",
    "ChunkStep",
    "GeneratorStep",
    "accumulation_dtype",
    "backward_chunks",
    "bind_parameters",
    "buffer_copies",
    "contract",
    "forward_chunks",
    "gather_patches",
    "pad_input",
    "range_blocks",
    "run_generator",
]

Generator = Callable[[Tensor], Tensor]


def pad_input(x: Tensor, geom: ConvGeometry) -> Tensor:
    """``x`` padded as ``nn.Conv*d`` pads it for ``padding_mode`` (``x`` itself if unpadded)."""
    if not geom.is_padded:
        return x
    mode = "constant" if geom.padding_mode == "zeros" else geom.padding_mode
    return F.pad(x, geom.torch_pad, mode=mode)


Block = tuple[int | slice, ...]


def range_blocks(start: int, end: int, sizes: Sequence[int]) -> list[Block]:
    """The flat row-major range ``[start, end)`` over ``sizes`` as rectangular index blocks.

    A range of rows is a partial row, whole rows and a partial row; one dimension up, the same
    over planes; so at most ``2 * len(sizes) - 1`` blocks, each a plain (strided) slice of a
    tensor of shape ``sizes``, in order.
    """
    if start >= end:
        return []
    if len(sizes) == 1:
        return [(slice(start, end),)]
    inner = math.prod(sizes[1:])
    first, last = start // inner, (end - 1) // inner
    if first == last:
        return [(first, *b) for b in range_blocks(start - first * inner, end - first * inner, sizes[1:])]
    head: list[Block] = []
    if start > first * inner:
        head = [(first, *b) for b in range_blocks(start - first * inner, inner, sizes[1:])]
        first += 1
    tail: list[Block] = []
    if end < (last + 1) * inner:
        tail = [(last, *b) for b in range_blocks(0, end - last * inner, sizes[1:])]
        last -= 1
    whole = [(slice(first, last + 1), *(slice(None),) * (len(sizes) - 1))] if first <= last else []
    return head + whole + tail


@dataclass(frozen=True)
class ChunkIndex:
    """The locations of one chunk, as rectangular blocks rather than index tensors.

    ``cells`` index ``(N, *out_spatial)`` (patches, and input-gradient taps); ``rows`` index
    ``(N, L)`` (output rows). Copying blocks out of strided views is several times faster than
    advanced indexing and allocates no index vectors.
    """

    start: int
    end: int
    cells: tuple[Block, ...]
    rows: tuple[Block, ...]

    @classmethod
    def build(cls, start: int, end: int, geom: ConvGeometry) -> ChunkIndex:
        cells = range_blocks(start, end, (geom.batch, *geom.out_spatial))
        rows = range_blocks(start, end, (geom.batch, geom.locations_per_image))
        return cls(start, end, tuple(cells), tuple(rows))


def _blockwise(view: Tensor, blocks: Sequence[Block], flat: Tensor, mode: str) -> None:
    """Move data between a chunk's rows ``flat`` ``(B, *item)`` and its ``blocks`` of ``view``.

    ``mode``: ``"read"`` copies the blocks into ``flat``; ``"write"`` copies ``flat`` into the
    blocks; ``"add"`` adds it to them (blocks never overlap, so no element is added twice).
    """
    pos, item = 0, max(1, math.prod(flat.shape[1:]))
    for block in blocks:
        part = view[block]
        n = part.numel() // item
        rows = flat[pos : pos + n].view(part.shape)
        if mode == "read":
            rows.copy_(part)
        elif mode == "write":
            part.copy_(rows)
        else:
            part.add_(rows)
        pos += n


def _patch_view(x_pad: Tensor, geom: ConvGeometry) -> Tensor:
    """A zero-copy view ``(N, *out_spatial, C, *kernel_size)`` of every patch.

    Patches overlap in memory, so this view is read-only in spirit; it is only
    ever indexed, which copies the selected patches out.
    """
    s_n, s_c, *s_sp = x_pad.stride()
    size = (geom.batch, *geom.out_spatial, geom.in_channels, *geom.kernel_size)
    stride = (
        s_n,
        *(st * s for st, s in zip(geom.stride, s_sp)),
        s_c,
        *(dil * s for dil, s in zip(geom.dilation, s_sp)),
    )
    return x_pad.as_strided(size, stride)


def gather_patches(x_pad: Tensor, chunk: ChunkIndex, geom: ConvGeometry) -> Tensor:
    """The chunk's patches as generator rows ``(B, C * prod(kernel_size))``, ``F.unfold`` order."""
    out = torch.empty(chunk.end - chunk.start, geom.patch_size, dtype=x_pad.dtype, device=x_pad.device)
    _blockwise(_patch_view(x_pad, geom), chunk.cells, out, "read")
    # A view, not the buffer: autocast caches its casts of leaves that require grad and are not
    # views for as long as its region lasts (all of backward's replay), so returning the buffer
    # would keep a low-precision copy of every chunk's patches alive until backward ends.
    return out.view(out.shape)


def scatter_patch_grads(grad_pad: Tensor, grad_patches: Tensor, chunk: ChunkIndex, geom: ConvGeometry) -> None:
    """Add patch gradients ``(B, C * K)`` into ``grad_pad`` (contiguous, padded shape).

    One kernel tap at a time: for a fixed tap the map from location to input
    element is injective, so each write is a plain accumulate without aliasing.
    """
    s_n, s_c, *s_sp = grad_pad.stride()
    size = (geom.batch, *geom.out_spatial, geom.in_channels)
    stride = (s_n, *(st * s for st, s in zip(geom.stride, s_sp)), s_c)
    per_tap = grad_patches.view(-1, geom.in_channels, geom.kernel_numel)
    taps = itertools.product(*(range(k) for k in geom.kernel_size))
    for t, tap in enumerate(taps):
        offset = sum(k * dil * s for k, dil, s in zip(tap, geom.dilation, s_sp))
        view = grad_pad.as_strided(size, stride, grad_pad.storage_offset() + offset)
        _blockwise(view, chunk.cells, per_tap[:, :, t], "add")


def buffer_copies(generator: Generator) -> dict[str, Tensor]:
    """Copies of the generator's buffers, for recomputation that must leave the real ones alone."""
    if not isinstance(generator, nn.Module):
        return {}
    return {name: b.clone() for name, b in generator.named_buffers()}


def bind_parameters(generator: Generator, tensors: dict[str, Tensor]) -> Generator:
    """``generator`` called with ``tensors`` (by name) in place of its parameters and buffers.

    Backward and the planner's probe differentiate through detached stand-ins rather than the
    real parameters, so the user's hooks (and DDP's) never see partial, per-chunk gradients,
    and in-place buffer updates during a probe land on copies.
    """
    if not tensors:
        return generator
    return lambda patches: torch.func.functional_call(generator, tensors, (patches,))  # type: ignore[arg-type]


class BoundStep(Protocol):
    """One chunk's arithmetic, bound to the parameter tensors of one call.

    ``step(patches)`` maps patch rows ``(B, P)`` to output rows ``(B, O)``; ``leaves`` are the
    tensors backward differentiates each chunk with respect to (besides the patches), and
    ``param_grads`` turns their summed gradients into gradients of the parameters, in order.
    """

    leaves: Sequence[Tensor]

    def __call__(self, patches: Tensor) -> Tensor: ...

    def param_grads(self, leaf_grads: Sequence[Tensor | None]) -> list[Tensor | None]: ...


class ChunkStep(Protocol):
    """A path's chunk arithmetic; ``bind`` fixes the parameters of one call (see :class:`BoundStep`).

    ``bind(None)`` uses the generator's own parameters (forward); backward and the planner's
    probe pass detached stand-ins, in ``named_parameters()`` order, and copies of the buffers
    (so that recomputing a chunk does not update running statistics a second time).
    """

    generator: Generator

    def bind(self, params: Sequence[Tensor] | None, buffers: dict[str, Tensor] | None = None) -> BoundStep: ...


@dataclass(frozen=True)
class GeneratorStep:
    """The generic path: the generator makes every patch's weight, then each is applied to its patch."""

    generator: Generator
    param_names: tuple[str, ...]
    geom: ConvGeometry

    def bind(self, params: Sequence[Tensor] | None, buffers: dict[str, Tensor] | None = None) -> _BoundGenerator:
        if params is None:
            return _BoundGenerator(self.generator, (), self.geom)
        tensors = {**dict(zip(self.param_names, params)), **(buffers or {})}
        return _BoundGenerator(bind_parameters(self.generator, tensors), tuple(params), self.geom)


@dataclass(frozen=True)
class _BoundGenerator:
    generator: Generator
    params: tuple[Tensor, ...]
    geom: ConvGeometry

    @property
    def leaves(self) -> list[Tensor]:
        return [p for p in self.params if p.requires_grad]

    def __call__(self, patches: Tensor) -> Tensor:
        return contract(run_generator(self.generator, patches, self.geom), patches, self.geom)

    def param_grads(self, leaf_grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        grads = iter(leaf_grads)
        return [next(grads) if p.requires_grad else None for p in self.params]


def run_generator(generator: Generator, patches: Tensor, geom: ConvGeometry) -> Tensor:
    """Call the generator and return its weights as ``(B, out_channels, (C // groups) * K)``.

    Raises:
        GeneratorOutputError: the output is not one weight per patch.

    """
    weights = generator(patches)
    rows = patches.shape[0]
    flat = (rows, geom.weight_numel)
    full = (rows, *geom.weight_shape)
    if not isinstance(weights, Tensor) or tuple(weights.shape) not in (flat, full):
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise GeneratorOutputError(
            f"The generator must return one weight per patch: expected shape {full} or {flat} "
            f"for {rows} patches of {geom.patch_size} features "
            f"(out_channels={geom.out_channels}, in_channels // groups="
            f"{geom.in_channels // geom.groups}, kernel_size={geom.kernel_size}), got {got}."
        )
    return weights.reshape(rows, geom.out_channels, geom.patch_size // geom.groups)


def contract(weights: Tensor, patches: Tensor, geom: ConvGeometry) -> Tensor:
    """Apply each patch's weight to that patch: ``(B, O, Cg*K) x (B, C*K) -> (B, O)``."""
    rows, groups = patches.shape[0], geom.groups
    per_group = geom.patch_size // groups
    w = weights.reshape(rows * groups, geom.out_channels // groups, per_group)
    p = patches.reshape(rows * groups, per_group, 1)
    return torch.bmm(w, p).view(rows, geom.out_channels)


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


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def forward_chunks(
    x: Tensor,
    step: BoundStep,
    geom: ConvGeometry,
    chunk_size: int,
    out_dtype: torch.dtype,
) -> tuple[Tensor, list[tuple[int, int]]]:
    """The output ``(N, O, *out_spatial)`` without bias, and the chunk ranges actually used.

    If a chunk runs out of device memory (``torch.OutOfMemoryError``), the chunk size is halved
    and the failed chunk retried from the random state it started with (so the draws a generator
    makes are those backward will replay); nothing computed before is lost. Backward must replay
    the same ranges, so they are returned.
    """
    y = torch.empty((geom.batch, geom.out_channels, *geom.out_spatial), dtype=out_dtype, device=x.device)
    rows = _output_rows(y, geom)
    x_pad = pad_input(x, geom)
    used: list[tuple[int, int]] = []
    start, size, total = 0, chunk_size, geom.num_patches
    while start < total:
        end = min(start + size, total)
        rng = _rng_state(x.device)
        try:
            chunk = ChunkIndex.build(start, end, geom)
            patches = gather_patches(x_pad, chunk, geom)
            _blockwise(rows, chunk.rows, step(patches).to(out_dtype), "write")
        except torch.OutOfMemoryError:
            if end - start == 1:
                raise
            _set_rng_state(rng, x.device)
            size = (end - start) // 2
            _warn_oom_once(start, end, size)
            continue
        used.append((start, end))
        start = end
    return y, used


def backward_chunks(
    x: Tensor,
    step: BoundStep,
    geom: ConvGeometry,
    ranges: Sequence[tuple[int, int]],
    grad_y: Tensor,
    *,
    input_grad: bool,
    splittable: bool = True,
) -> tuple[Tensor | None, list[Tensor | None]]:
    """Recompute every chunk and return the gradients of ``x`` and of the step's parameters.

    Must run with grad mode enabled and with the RNG and autocast state of the forward
    restored by the caller, replaying the forward's chunk ``ranges`` so that each chunk is
    recomputed exactly. Parameter gradients are summed over chunks; patch gradients are
    scattered into one padded buffer that is mapped back through the padding at the end.
    A chunk that runs out of device memory is split in two and retried when ``splittable``
    (the generator draws no random numbers, so smaller chunks recompute the same values).
    The parameter gradients are summed in at least float32 (:func:`accumulation_dtype`) and
    cast back at the end, so that a half-precision call does not lose accuracy as the number
    of chunks grows. The input gradient is accumulated in ``x``'s dtype: each of its elements
    receives at most ``prod(kernel_size)`` patch gradients whatever the chunking, so a float32
    buffer (twice the memory of the largest buffer, for half inputs) would buy little.
    """
    wanted = list(step.leaves)
    if not (input_grad or wanted):
        return None, step.param_grads([None] * len(wanted))
    x_leaf = x.detach().requires_grad_(input_grad)
    x_pad = pad_input(x_leaf, geom)
    source = x_pad.detach()
    grad_pad = torch.zeros(source.shape, dtype=x.dtype, device=x.device) if input_grad else None
    grad_rows = _output_rows(grad_y, geom)
    param_grads: list[Tensor | None] = [None] * len(wanted)
    pending = list(reversed(ranges))
    while pending:
        start, end = pending.pop()
        try:
            chunk = ChunkIndex.build(start, end, geom)
            patches = gather_patches(source, chunk, geom).requires_grad_(input_grad)
            out = step(patches)
            targets = ([patches] if input_grad else []) + wanted
            upstream = torch.empty(end - start, geom.out_channels, dtype=out.dtype, device=out.device)
            _blockwise(grad_rows, chunk.rows, upstream, "read")  # copy_ casts to out's dtype
            grads = torch.autograd.grad(out, targets, upstream, allow_unused=True)
        except torch.OutOfMemoryError:
            if not splittable or end - start == 1:
                raise
            mid = (start + end) // 2
            _warn_oom_once(start, end, mid - start)
            pending += [(mid, end), (start, mid)]
            continue
        if input_grad:
            assert grad_pad is not None
            if grads[0] is not None:
                scatter_patch_grads(grad_pad, grads[0].to(grad_pad.dtype), chunk, geom)
            grads = grads[1:]
        for i, g in enumerate(grads):
            if g is None:
                continue
            if param_grads[i] is None:
                param_grads[i] = g.to(accumulation_dtype(g.dtype), copy=True)
            else:
                param_grads[i].add_(g)
    grad_x = None
    if input_grad:
        assert grad_pad is not None
        grad_x = grad_pad if x_pad is x_leaf else torch.autograd.grad(x_pad, x_leaf, grad_pad)[0]
    # back to each leaf's dtype (the sums ran in float32 for half-precision leaves)
    summed = [_cast(g, leaf.dtype) for g, leaf in zip(param_grads, wanted)]
    return grad_x, step.param_grads(summed)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype sums over chunks run in: ``dtype``, but at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)
