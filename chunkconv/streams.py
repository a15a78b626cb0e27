"""The kinds of per-location input a call streams, each described once when the call is described.

A call's generator receives, per location, rows of one or more *streams*: the input's patches,
per-location features, a guide windowed like the input, the locations' positions. Each kind of
stream is one :class:`StreamKind` subclass that owns everything about it: which tensors of the
call it reads (:meth:`StreamKind.sources`), the grid they live on (:attr:`StreamKind.grid`:
windowed like the input, one column per output location, or none), the rows it gives a chunk
(:meth:`StreamKind.open`, a :class:`~chunkconv.gather.Stream`), the random stand-ins the
planner's probes read (:meth:`StreamKind.probe_sources`) and the chunk-independent memory it
costs (:meth:`StreamKind.fixed_costs`). :data:`KINDS` lists them by name, the names ``inputs=``
accepts; nothing else in the package compares kind names.

A :class:`StreamSpec` is one stream of one call (its kind, channels and whether it needs a
gradient), made once by :func:`describe_streams` when the call is described and read by the
planner, the probes, the executor and the autograd Function alike.

Adding a kind (sampled patches for deformable convolution; positions in the frame of a larger
image) is one subclass here and one entry in :data:`KINDS`; a kind may carry parameters (it is a
frozen dataclass: a tile's origin, say) and may read several of the call's tensors (``arity``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor

from .gather import ChunkIndex, FeatureStream, GuideStream, PatchStream, PositionStream, Stream
from .geometry import ConvGeometry
from .sampling import DeformPatchStream, deform_fixed_costs

__all__ = [
    "KINDS",
    "Features",
    "Guide",
    "Patches",
    "Positions",
    "SampledPatches",
    "StreamKind",
    "StreamSpec",
    "default_streams",
    "describe_streams",
    "make_streams",
    "stream_sources",
]


@dataclass(frozen=True)
class StreamKind:
    """One kind of per-location input (see the module docstring); subclasses set the class attributes.

    Attributes:
        name: what ``inputs=`` calls it (and, for a side input, the call's keyword argument).
        arity: how many of the call's tensors it reads (the patches: the input; positions: none).
        grid: the grid its tensor lives on: ``"input"`` (windowed like the input), ``"output"``
            (one column per output location) or ``""`` (no tensor).
        side: given to the call as the keyword tensor ``name=`` (the input's patches are not).
        where: how its tensor relates to the call, for error messages.
        selectable: ``inputs=`` may name it (the sampled patches are chosen by ``offsets=``).

    """

    name: ClassVar[str]
    arity: ClassVar[int] = 1
    grid: ClassVar[str] = "input"
    side: ClassVar[bool] = True
    where: ClassVar[str] = ""
    selectable: ClassVar[bool] = True

    def sources(self, input: Tensor, side: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """The call's tensors this kind reads, batched (``arity`` of them)."""
        return (side[self.name],)

    def open(
        self,
        spec: StreamSpec,
        sources: Sequence[Tensor],
        geom: ConvGeometry,
        grads: Sequence[bool],
        like: Tensor,
        layout: str = "rows",
    ) -> Stream:
        """The stream of one call on ``geom`` (``like``: the input, for dtype and device; ``layout``: the
        patch layout the step reads, :data:`chunkconv.gather.PATCH_LAYOUTS`).
        """
        raise NotImplementedError

    def split_grad(self, grad: object) -> tuple[Tensor | None, ...]:
        """The gradients of its ``sources`` from its stream's ``grad()`` (one per source)."""
        assert grad is None or isinstance(grad, Tensor)
        return (grad,) * self.arity

    def width(self, channels: int, geom: ConvGeometry) -> int:
        """The width of one row the generator receives."""
        return channels * geom.kernel_numel if self.grid == "input" else channels

    def probe_sources(self, spec: StreamSpec, probe: ConvGeometry, dtype: torch.dtype, device: torch.device) -> list:
        """Random tensors standing in for its sources on a probe's geometry."""
        spatial = probe.out_spatial if self.grid == "output" else probe.in_spatial
        return [torch.randn((1, spec.channels, *spatial), dtype=dtype, device=device) for _ in range(self.arity)]

    def fixed_costs(self, spec: StreamSpec, geom: ConvGeometry, item: int) -> tuple[dict[str, int], dict[str, int]]:
        """The chunk-independent bytes it adds to forward and to backward, by name (``item``: bytes per element)."""
        name = "input" if not self.side else self.name
        padded = geom.batch * spec.channels * math.prod(geom.padded_spatial) * item
        unpadded = geom.batch * spec.channels * math.prod(geom.in_spatial) * item
        pad_copy = padded if geom.is_padded else 0
        grad = spec.requires_grad
        backward = {
            f"padded {name}": pad_copy,
            f"{name} gradient (padded)": padded if grad else 0,
            f"{name} gradient": unpadded if grad and geom.is_padded else 0,
        }
        return {f"padded {name}": pad_copy}, backward


@dataclass(frozen=True)
class Patches(StreamKind):
    """The input's patches: rows ``(B, C * prod(kernel_size))`` in ``F.unfold`` order, in the step's layout."""

    name: ClassVar[str] = "patches"
    side: ClassVar[bool] = False
    where: ClassVar[str] = "the input"

    def sources(self, input: Tensor, side: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """The input itself."""
        return (input,)

    def open(
        self,
        spec: StreamSpec,
        sources: Sequence[Tensor],
        geom: ConvGeometry,
        grads: Sequence[bool],
        like: Tensor,
        layout: str = "rows",
    ) -> Stream:
        """A :class:`~chunkconv.gather.PatchStream` of the input, in the step's layout."""
        return PatchStream(sources[0], geom, input_grad=grads[0], layout=layout)


@dataclass(frozen=True)
class Features(StreamKind):
    """Per-location features ``(N, F, *out)``: rows ``(B, F)``, not convolved."""

    name: ClassVar[str] = "features"
    grid: ClassVar[str] = "output"
    where: ClassVar[str] = "one column per output location"

    def open(
        self,
        spec: StreamSpec,
        sources: Sequence[Tensor],
        geom: ConvGeometry,
        grads: Sequence[bool],
        like: Tensor,
        layout: str = "rows",
    ) -> Stream:
        """A :class:`~chunkconv.gather.FeatureStream`."""
        return FeatureStream(sources[0], geom, input_grad=grads[0])

    def fixed_costs(self, spec: StreamSpec, geom: ConvGeometry, item: int) -> tuple[dict[str, int], dict[str, int]]:
        """Read in place: only its gradient, one buffer of its size, is fixed."""
        return {}, {f"{self.name} gradient": geom.num_patches * spec.channels * item if spec.requires_grad else 0}


@dataclass(frozen=True)
class Guide(StreamKind):
    """A guide ``(N, G, *spatial)`` windowed like the input: rows ``(B, G * prod(kernel_size))``, always in rows."""

    name: ClassVar[str] = "guide"
    where: ClassVar[str] = "windowed like the input"

    def open(
        self,
        spec: StreamSpec,
        sources: Sequence[Tensor],
        geom: ConvGeometry,
        grads: Sequence[bool],
        like: Tensor,
        layout: str = "rows",
    ) -> Stream:
        """A :class:`~chunkconv.gather.GuideStream` (always in rows: they go to the generator)."""
        return GuideStream(sources[0], geom, input_grad=grads[0])


@dataclass(frozen=True)
class Positions(StreamKind):
    """Each output location's window centre in the input, rows ``(B, ndim)`` in ``[-1, 1]``; no tensor, no gradient."""

    name: ClassVar[str] = "positions"
    arity: ClassVar[int] = 0
    grid: ClassVar[str] = ""
    side: ClassVar[bool] = False

    def sources(self, input: Tensor, side: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """None: positions are computed."""
        return ()

    def open(
        self,
        spec: StreamSpec,
        sources: Sequence[Tensor],
        geom: ConvGeometry,
        grads: Sequence[bool],
        like: Tensor,
        layout: str = "rows",
    ) -> Stream:
        """A :class:`~chunkconv.gather.PositionStream` in the input's dtype and device."""
        return PositionStream(geom, like.dtype, like.device)

    def width(self, channels: int, geom: ConvGeometry) -> int:
        """One coordinate per spatial dimension."""
        return geom.ndim

    def fixed_costs(self, spec: StreamSpec, geom: ConvGeometry, item: int) -> tuple[dict[str, int], dict[str, int]]:
        """None: positions are computed per chunk."""
        return {}, {}


@dataclass(frozen=True)
class SampledPatches(StreamKind):
    """The input's *sampled* patches (deformable convolution): rows ``(B, C * prod(kernel_size))`` in
    ``F.unfold`` order, read at the offsets' positions (:class:`~chunkconv.sampling.DeformPatchStream`).

    In place of :class:`Patches` when a call has ``offsets=``: what the kernel form contracts and
    what a generator taking ``"patches"`` receives. Its sources are the input, the canonical
    offsets ``(N, G, K, d, *out)`` and, when ``masked``, the mask ``(N, G, K, *out)``; all three
    get gradients. ``grads``: which of them need one (for the planner's fixed costs).
    """

    name: ClassVar[str] = "sampled patches"
    side: ClassVar[bool] = False
    selectable: ClassVar[bool] = False
    where: ClassVar[str] = "the input, sampled at the offsets"

    groups: int = 1
    masked: bool = False
    rule: str = "torchvision"
    grads: tuple[bool, ...] = (False, False, False)

    @property
    def arity(self) -> int:  # type: ignore[override]
        """The input and the offsets, and the mask when there is one."""
        return 3 if self.masked else 2

    def sources(self, input: Tensor, side: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """The input, the canonical offsets and (when ``masked``) the mask."""
        return (input, side["offsets"], side["mask"]) if self.masked else (input, side["offsets"])

    def open(
        self,
        spec: StreamSpec,
        sources: Sequence[Tensor],
        geom: ConvGeometry,
        grads: Sequence[bool],
        like: Tensor,
        layout: str = "rows",
    ) -> Stream:
        """A :class:`~chunkconv.sampling.DeformPatchStream` whose ``grad()`` returns all three gradients."""
        mask = sources[2] if self.masked else None
        stream = DeformPatchStream(
            sources[0],
            sources[1],
            mask,
            geom,
            rule=self.rule,
            input_grad=grads[0],
            offset_grad=grads[1],
            mask_grad=self.masked and grads[2],
            layout=layout,
        )
        # the executor hands what grad() returns to split_grad untouched (typed as the protocol's)
        return cast(Stream, _AllGrads(stream))

    def split_grad(self, grad: object) -> tuple[Tensor | None, ...]:
        """The input's, the offsets' (and the mask's) gradients from the stream's tuple."""
        if grad is None:
            return (None,) * self.arity
        assert isinstance(grad, tuple)
        return tuple(grad[: self.arity])

    def probe_sources(self, spec: StreamSpec, probe: ConvGeometry, dtype: torch.dtype, device: torch.device) -> list:
        """A random input, random canonical offsets and (when ``masked``) a random mask in ``[0, 1)``."""
        k, d, out = probe.kernel_numel, probe.ndim, probe.out_spatial
        sources = [
            torch.randn((1, spec.channels, *probe.in_spatial), dtype=dtype, device=device),
            torch.randn((1, self.groups, k, d, *out), dtype=dtype, device=device),
        ]
        if self.masked:
            sources.append(torch.rand((1, self.groups, k, *out), dtype=dtype, device=device))
        return sources

    def fixed_costs(self, spec: StreamSpec, geom: ConvGeometry, item: int) -> tuple[dict[str, int], dict[str, int]]:
        """The sampler's buffers (:func:`~chunkconv.sampling.deform_fixed_costs`)."""
        dtype = {2: torch.float16, 4: torch.float32, 8: torch.float64}[item]
        want = self.grads if spec.requires_grad else (False, False, False)
        return deform_fixed_costs(
            geom, self.groups, dtype, input_grad=want[0], offset_grad=want[1], mask_grad=self.masked and want[2]
        )

    def per_location_bytes(self, geom: ConvGeometry, item: int) -> int:
        """Bytes of offsets (and mask) one output location reads (streamed like features)."""
        return self.groups * geom.kernel_numel * (geom.ndim + int(self.masked)) * item


class _AllGrads:
    """A :class:`DeformPatchStream` whose ``grad()`` returns all three gradients (input, offsets,
    mask), which :meth:`SampledPatches.split_grad` hands back to the sources.
    """

    def __init__(self, stream: DeformPatchStream) -> None:
        self.stream = stream
        self.requires_grad = stream.requires_grad

    def gather(self, chunk: ChunkIndex) -> Tensor:
        return self.stream.gather(chunk)

    def add_grad(self, chunk: ChunkIndex, grad: Tensor) -> None:
        self.stream.add_grad(chunk, grad)

    def grad(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.stream.grads()


# Every kind a call can stream, by its name (for the selectable ones, the name ``inputs=`` gives
# it), in the order the docs list them.
KINDS: dict[str, StreamKind] = {k.name: k for k in (Patches(), Features(), Guide(), Positions(), SampledPatches())}


@dataclass(frozen=True)
class StreamSpec:
    """One stream of one call: its kind, the channels of its tensor, whether it needs a gradient."""

    kind: StreamKind
    channels: int
    requires_grad: bool = False

    @property
    def name(self) -> str:
        """The kind's name."""
        return self.kind.name

    @property
    def arity(self) -> int:
        """How many of the call's tensors the stream reads."""
        return self.kind.arity


def describe_streams(
    inputs: Sequence[str],
    in_channels: int,
    input_grad: bool,
    side: Mapping[str, tuple[int, bool]],
    sampled: SampledPatches | None = None,
) -> tuple[StreamSpec, ...]:
    """The call's streams: the input's patches first, then each other kind ``inputs`` names, in order.

    ``side`` maps a side input's name to its ``(channels, requires_grad)``; ``sampled`` (a call
    with offsets) takes the place of the plain patches, needing a gradient when any of its
    sources does.
    """
    first = StreamSpec(KINDS["patches"], in_channels, input_grad)
    if sampled is not None:
        first = StreamSpec(sampled, in_channels, any(sampled.grads[: sampled.arity]))
    specs = [first]
    for name in inputs:
        kind = KINDS[name]
        if isinstance(kind, Patches):
            continue
        channels, grad = side.get(name, (0, False))
        specs.append(StreamSpec(kind, channels, grad and kind.arity > 0))
    return tuple(specs)


def default_streams(geom: ConvGeometry, input_grad: bool = False) -> tuple[StreamSpec, ...]:
    """The input's patches alone (a call whose generator receives only them)."""
    return (StreamSpec(KINDS["patches"], geom.in_channels, input_grad),)


def stream_sources(specs: Sequence[StreamSpec], input: Tensor, side: Mapping[str, Tensor]) -> list[Tensor]:
    """The tensors the streams read, in order (what the autograd Function takes as sources)."""
    return [t for s in specs for t in s.kind.sources(input, side)]


def make_streams(
    specs: Sequence[StreamSpec],
    sources: Sequence[Tensor],
    geom: ConvGeometry,
    grads: Sequence[bool] | None = None,
    *,
    like: Tensor | None = None,
    patch_layout: str = "rows",
) -> list[Stream]:
    """One stream per spec, each taking its ``arity`` of ``sources`` in order (``grads``: which want one).

    ``like`` gives sourceless streams their dtype and device (default: the first source, the input);
    the input's patches come in ``patch_layout`` (a guide's always in rows: they go to the generator).
    """
    wants = list(grads) if grads is not None else [False] * len(sources)
    reference = like if like is not None else sources[0]
    streams, pos = [], 0
    for spec in specs:
        n = spec.arity
        streams.append(
            spec.kind.open(spec, sources[pos : pos + n], geom, wants[pos : pos + n], reference, patch_layout)
        )
        pos += n
    return streams
