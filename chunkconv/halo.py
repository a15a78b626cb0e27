"""Receptive fields, halos and tile plans: the arithmetic of exact tiled inference.

Pure Python: no tensors, no Dask. A stack of layers is described per spatial axis by each layer's
kernel ``k``, stride ``s``, dilation ``d`` and left/right padding (:class:`LayerGeometry`), and
composed into a :class:`ReceptiveField`: the total stride ``S = prod s``, the receptive field
``r = 1 + sum d_l (k_l - 1) j_{l-1}`` and the effective left padding ``P = sum p_l j_{l-1}``
(``j_l = s_1 ... s_l``, ``j_0 = 1``). Output ``o`` of the stack then reads the inputs
``[o S - P, o S - P + r)`` (those inside the input; the layers pad the rest themselves).

A tile owning the outputs of the input chunk ``[c, c')`` (``c`` and ``c'`` multiples of ``S``)
therefore needs ``S * ceil(P / S)`` elements before it and ``max(0, r - P - S)`` after it: the
halo. :class:`TilePlan` applies that to a shape and a chunking: it aligns chunk starts to
multiples of ``S``, merges chunks smaller than the halo, and gives every tile's extent in the
input, the outputs it owns and the crop that keeps them, so that running the layers on each tile
(with their own padding, which at the input's border is the real border) and keeping the owned
outputs gives the whole output exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AxisTiles", "LayerGeometry", "ReceptiveField", "TilePlan", "compose", "plan_tiles"]


@dataclass(frozen=True)
class LayerGeometry:
    """The geometry of one layer, per spatial axis.

    Attributes:
        name: the layer's name in the module (for tables and errors).
        kernel_size, stride, dilation: per spatial axis.
        pads: ``(left, right)`` padding per spatial axis.
        min_size: per axis, the smallest input the layer accepts beyond its kernel (``reflect``
            padding ``p`` needs ``p + 1`` elements); ``0`` for none.

    """

    name: str
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    min_size: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        """The number of spatial dimensions."""
        return len(self.kernel_size)

    @property
    def is_pointwise(self) -> bool:
        """Whether every output is its own input location (kernel 1, stride 1, no padding)."""
        return all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride) and not self._padded

    @property
    def _padded(self) -> bool:
        return any(p for pair in self.pads for p in pair)

    def out_size(self, size: Sequence[int]) -> tuple[int, ...] | None:
        """The output size for an input of spatial ``size`` (``None`` where the layer cannot run)."""
        out = []
        for n, k, s, d, (left, right), least in zip(
            size, self.kernel_size, self.stride, self.dilation, self.pads, self.min_size or (0,) * self.ndim
        ):
            o = (n + left + right - d * (k - 1) - 1) // s + 1
            if o < 1 or n < least:
                return None
            out.append(o)
        return tuple(out)


def pointwise(name: str, ndim: int) -> LayerGeometry:
    """The geometry of a layer that acts on each location alone (activations, BatchNorm in eval)."""
    ones = (1,) * ndim
    return LayerGeometry(name, ones, ones, ones, ((0, 0),) * ndim)


@dataclass(frozen=True)
class ReceptiveField:
    """What a stack of layers reads, per spatial axis (see the module docstring for the algebra).

    Attributes:
        layers: the stack's layers in order.
        stride: ``S``, the total stride.
        padding: ``P``, the effective left padding.
        size: ``r``, the receptive field.

    """

    layers: tuple[LayerGeometry, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """The number of spatial dimensions."""
        return len(self.stride)

    @property
    def halo(self) -> tuple[tuple[int, int], ...]:
        """Per axis ``(before, after)``: ``S * ceil(P / S)`` and ``max(0, r - P - S)``."""
        return tuple((s * -(-p // s), max(0, r - p - s)) for s, p, r in zip(self.stride, self.padding, self.size))

    def input_frames(self) -> list[tuple[int, ...]]:
        """Per layer, the stride ``j_{l-1}`` of its input in units of the stack's input."""
        frames, j = [], [1] * self.ndim
        for layer in self.layers:
            frames.append(tuple(j))
            j = [a * b for a, b in zip(j, layer.stride)]
        return frames

    def sizes(self, spatial: Sequence[int]) -> list[tuple[int, ...]] | None:
        """Every layer's input size, then the output's, for an input of ``spatial`` (``None``: cannot run)."""
        out = [tuple(spatial)]
        for layer in self.layers:
            nxt = layer.out_size(out[-1])
            if nxt is None:
                return None
            out.append(nxt)
        return out

    def out_shape(self, spatial: Sequence[int]) -> tuple[int, ...] | None:
        """The stack's output spatial size for an input of ``spatial`` (``None`` where it cannot run)."""
        sizes = self.sizes(spatial)
        return None if sizes is None else sizes[-1]

    def tile_plan(self, shape: Sequence[int], chunks: Sequence[Sequence[int]]) -> TilePlan:
        """The :class:`TilePlan` for an input of ``shape`` ``(N, C, *spatial)`` chunked as ``chunks``."""
        return plan_tiles(self, shape, chunks)

    def __str__(self) -> str:
        rows = [("layer", "kernel", "stride", "dilation", "padding")]
        for layer in self.layers:
            rows.append((layer.name, str(layer.kernel_size), str(layer.stride), str(layer.dilation), str(layer.pads)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        table = "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
        return (
            f"ReceptiveField over {self.ndim} spatial axes, {len(self.layers)} layers\n{table}\n"
            f"  total stride S={self.stride}, effective padding P={self.padding}, receptive field r={self.size}\n"
            f"  halo (before, after) per axis: {self.halo}"
        )

    __repr__ = __str__


def compose(layers: Sequence[LayerGeometry], ndim: int) -> ReceptiveField:
    """Compose layers into a :class:`ReceptiveField` (``j_l = prod s``, ``r``, ``P`` as in the module docstring).

    Raises:
        ValueError: a layer over another number of spatial axes than ``ndim``.

    """
    stride, padding, size = [1] * ndim, [0] * ndim, [1] * ndim
    for layer in layers:
        if layer.ndim != ndim:
            raise ValueError(f"Expected layers over {ndim} spatial axes, got {layer.name!r} over {layer.ndim}.")
        for a in range(ndim):
            size[a] += layer.dilation[a] * (layer.kernel_size[a] - 1) * stride[a]
            padding[a] += layer.pads[a][0] * stride[a]
            stride[a] *= layer.stride[a]
    return ReceptiveField(tuple(layers), tuple(stride), tuple(padding), tuple(size))


@dataclass(frozen=True)
class AxisTiles:
    """The tiles along one spatial axis.

    Attributes:
        chunks: the input chunks the tiles own (after alignment and merging).
        out_chunks: the output chunks, one per input chunk.
        starts: per tile, its first input element (the chunk's start minus the halo, clipped at 0).
        stops: per tile, one past its last input element (clipped at the input's size).
        crops: per tile, ``(first, stop)`` of the owned outputs within the tile's output.

    """

    chunks: tuple[int, ...]
    out_chunks: tuple[int, ...]
    starts: tuple[int, ...]
    stops: tuple[int, ...]
    crops: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TilePlan:
    """How a stack runs over one chunked input, tile by tile (see :func:`plan_tiles`).

    Attributes:
        field: the stack's :class:`ReceptiveField`.
        shape: the input's shape ``(N, C, *spatial)``.
        requested: the input's chunks as given.
        chunks: the input's chunks the tiles use (``C`` in one chunk, spatial starts aligned).
        out_shape: the output's spatial size.
        out_chunks: the output's spatial chunks.
        axes: per spatial axis, its :class:`AxisTiles`.
        notes: what was changed from ``requested`` and why.

    """

    field: ReceptiveField
    shape: tuple[int, ...]
    requested: tuple[tuple[int, ...], ...]
    chunks: tuple[tuple[int, ...], ...]
    out_shape: tuple[int, ...]
    out_chunks: tuple[tuple[int, ...], ...]
    axes: tuple[AxisTiles, ...]
    notes: tuple[str, ...]

    @property
    def halo(self) -> tuple[tuple[int, int], ...]:
        """Per spatial axis, the input a tile reads before and after the outputs it owns."""
        return self.field.halo

    @property
    def rechunked(self) -> bool:
        """Whether the input must be rechunked before tiling."""
        return self.chunks != self.requested

    @property
    def num_tiles(self) -> int:
        """How many tasks (blocks) the tiled graph runs."""
        return len(self.chunks[0]) * math.prod(len(a.chunks) for a in self.axes)

    @property
    def overhead(self) -> float:
        """Input elements the tiles read, over the input's elements (1.0: no halo)."""
        spatial = self.shape[2:]
        return math.prod(sum(b - a for a, b in zip(t.starts, t.stops)) / n for t, n in zip(self.axes, spatial))

    def __str__(self) -> str:
        lines = [
            f"TilePlan: input {self.shape} -> output spatial {self.out_shape}, {self.num_tiles} tiles",
            f"  halo (before, after) per axis: {self.halo}; total stride {self.field.stride}",
            f"  input chunks: {_short(self.chunks)}",
            f"  output chunks: {_short(self.out_chunks)}",
            f"  overhead: the tiles read {self.overhead:.3f}x the input",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _short(chunks: Sequence[Sequence[int]]) -> str:
    parts = []
    for c in chunks:
        if len(c) > 6:
            parts.append(f"({c[0]}, {c[1]}, ..., {c[-1]}) x{len(c)}")
        else:
            parts.append(str(tuple(c)))
    return "(" + ", ".join(parts) + ")"


def _bounds(chunks: Sequence[int]) -> list[int]:
    out = [0]
    for c in chunks:
        out.append(out[-1] + c)
    return out


def _axis_tiles(
    field: ReceptiveField, axis: int, n: int, m: int, bounds: list[int], spatial: Sequence[int]
) -> AxisTiles | int:
    """The tiles of one axis for chunk boundaries ``bounds``, or the index of a chunk to merge away."""
    s = field.stride[axis]
    before, after = field.halo[axis]
    starts, stops, crops, out_bounds = [], [], [], []
    k = len(bounds) - 1
    for i in range(k):
        c0, c1 = bounds[i], bounds[i + 1]
        if i and c1 - c0 < max(before, after):
            return i  # smaller than the halo: dask's overlap reads only neighbouring chunks
        o0 = c0 // s
        o1 = m if i == k - 1 else min(c1 // s, m)
        if o1 <= o0:
            return i
        a, b = max(0, c0 - before), min(n, c1 + after)
        size = list(spatial)
        size[axis] = b - a
        tile_out = field.out_shape(size)
        if tile_out is None or tile_out[axis] < o1 - a // s:
            return i
        starts.append(a)
        stops.append(b)
        crops.append((o0 - a // s, o1 - a // s))
        out_bounds.append((o0, o1))
    if k > 1 and bounds[1] < max(before, after):
        return 1  # the first chunk is smaller than the halo: merge the second into it
    chunks = tuple(bounds[i + 1] - bounds[i] for i in range(k))
    return AxisTiles(chunks, tuple(o1 - o0 for o0, o1 in out_bounds), tuple(starts), tuple(stops), tuple(crops))


def plan_tiles(field: ReceptiveField, shape: Sequence[int], chunks: Sequence[Sequence[int]]) -> TilePlan:
    """Plan tiles for an input of ``shape`` ``(N, C, *spatial)`` chunked as ``chunks`` (Dask's chunks).

    Chunk starts are moved down to multiples of the total stride; a chunk smaller than the halo,
    one that would own no output, or one whose tile the layers cannot run on is merged into its
    neighbour; the channel axis becomes one chunk. Every change is listed in ``notes``.

    Raises:
        ValueError: ``shape`` and ``chunks`` disagree, or the stack cannot run on the whole input.

    """
    shape = tuple(int(v) for v in shape)
    requested = tuple(tuple(int(c) for c in axis) for axis in chunks)
    d = field.ndim
    if len(shape) != d + 2 or len(requested) != d + 2 or any(sum(c) != n for c, n in zip(requested, shape)):
        raise ValueError(
            f"Expected an input (N, C, *spatial) of {d + 2} dims with chunks that sum to its shape, "
            f"got shape {shape} and chunks {requested}."
        )
    spatial = shape[2:]
    out = field.out_shape(spatial)
    if out is None:
        raise ValueError(
            f"The stack cannot run on an input of spatial size {spatial}: some layer's kernel does not fit "
            f"(receptive field {field.size})."
        )
    notes = []
    if len(requested[1]) != 1:
        notes.append(f"the channel axis is one chunk (was {len(requested[1])} chunks)")
    axes = []
    new_chunks: list[tuple[int, ...]] = [requested[0], (shape[1],)]
    for a in range(d):
        n, s = spatial[a], field.stride[a]
        given = _bounds(requested[2 + a])
        bounds = sorted({0, n} | {b - b % s for b in given[1:-1] if b - b % s > 0})
        if bounds != given:
            notes.append(f"axis {2 + a}: chunk starts moved down to multiples of the total stride {s}")
        merged = False
        while True:
            tiles = _axis_tiles(field, a, n, out[a], bounds, spatial)
            if isinstance(tiles, AxisTiles):
                break
            assert isinstance(tiles, int) and len(bounds) > 2, (tiles, bounds)
            del bounds[max(tiles, 1)]
            merged = True
        if merged:
            notes.append(
                f"axis {2 + a}: chunks smaller than the halo {field.halo[a]} (or owning no output) merged "
                "into their neighbours"
            )
        axes.append(tiles)
        new_chunks.append(tiles.chunks)
    return TilePlan(
        field=field,
        shape=shape,
        requested=requested,
        chunks=tuple(new_chunks),
        out_shape=out,
        out_chunks=tuple(t.out_chunks for t in axes),
        axes=tuple(axes),
        notes=tuple(notes),
    )
