"""Exact tiled inference over Dask arrays: :func:`tiled` and :func:`tile_plan`.

A module read by :mod:`.tile_layers` has a receptive field (:mod:`.halo`); this module turns it
into a Dask graph: rechunk where the plan says so, overlap the input by the halo with
``boundary="none"`` (tiles at the border see the real border and the layers pad it themselves),
run the module on each tile and keep the outputs the tile owns. The module travels once, as one
``dask.delayed`` object every task depends on. Inference only: no gradient flows through tiles.

Dask (and NumPy) are imported when a function here is called, not when chunkconv is imported:
``pip install "chunkconv[dask]"``.
"""

from __future__ import annotations

import copy
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .gather import position_frame
from .halo import TilePlan
from .tile_layers import TileModel, analyse

__all__ = ["tile_plan", "tiled"]


def _dask() -> Any:
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - the suite installs dask
        raise ImportError(
            'chunkconv.tiled needs Dask: pip install "chunkconv[dask]" (dask[array] and distributed)'
        ) from None
    return da


def _check_array(x: object, name: str, ndim: int | None = None) -> Any:
    da = _dask()
    if not isinstance(x, da.Array):
        raise TypeError(
            f"Invalid type for `{name}`; expected a dask.array.Array (e.g. dask.array.from_zarr(...)), "
            f"got {type(x).__name__}."
        )
    if ndim is None and x.ndim not in (3, 4, 5):
        raise ValueError(f"Expected `{name}` of 3, 4 or 5 dims (N, C, *spatial), got shape {x.shape}.")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"Expected `{name}` of {ndim} dims (N, C, *spatial) like the input, got shape {x.shape}.")
    if any(n != n for n in x.shape):  # NaN: an unknown chunk size
        raise ValueError(f"Expected `{name}` of known shape, got {x.shape}; call .compute_chunk_sizes() first.")
    return x


def tile_plan(
    module: nn.Module,
    x: Any,
    chunks: Sequence[Sequence[int]] | None = None,
    *,
    halo: object = None,
    stride: object = None,
) -> TilePlan:
    """How :func:`tiled` would run ``module`` over ``x``, without running anything.

    Args:
        module: as for :func:`tiled`.
        x: a Dask array ``(N, C, *spatial)``, or its shape (then ``chunks`` is required).
        chunks: the input's chunks, as Dask gives them (``x.chunks``). Default: ``x.chunks``.
        halo: as for :func:`tiled`. Default: ``None``.
        stride: as for :func:`tiled`. Default: ``None``.

    Returns:
        A :class:`~chunkconv.halo.TilePlan`: the halo, the chunks the tiles use (and why they
        differ from the given ones), the output chunks and the overhead factor; print it.

    Examples:
        >>> import torch, chunkconv
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, padding=2), torch.nn.ReLU())
        >>> p = chunkconv.tile_plan(net, (1, 3, 100, 100), ((1,), (3,), (50, 50), (64, 36)))
        >>> p.halo, p.out_chunks
        (((2, 2), (2, 2)), ((50, 50), (64, 36)))

    """
    if chunks is None:
        shape, chunks = tuple(x.shape), x.chunks
    else:
        shape = tuple(x)
    if len(shape) not in (3, 4, 5):
        raise ValueError(f"Expected an input of 3, 4 or 5 dims (N, C, *spatial), got shape {tuple(shape)}.")
    model = analyse(module, len(shape) - 2, halo=halo, stride=stride)
    return model.field.tile_plan(shape, chunks)


@dataclass(frozen=True)
class _Tiles:
    """What every task needs besides its blocks: small, embedded in the graph."""

    ndim: int
    halo: object
    stride: object
    starts: tuple[tuple[int, ...], ...]
    crops: tuple[tuple[tuple[int, int], ...], ...]
    whole: tuple[tuple[int, ...], ...]  # every layer's input size in the whole input
    sides: tuple[str, ...]
    device: str | None
    threads: int | str | None


_MOVED: dict[tuple[int, str], nn.Module] = {}
_MOVED_LOCK = threading.Lock()


def _on_device(module: nn.Module, device: str | None) -> nn.Module:
    """``module`` on ``device``: a copy made once per process (the caller's module is left where it is)."""
    if device is None:
        return module
    key = (id(module), device)
    with _MOVED_LOCK:
        if key not in _MOVED:
            _MOVED.clear()  # one module per process at a time: do not keep copies of old ones
            _MOVED[key] = copy.deepcopy(module).to(device)
        return _MOVED[key]


def _task_threads(threads: int | str | None) -> int | None:
    """Torch threads for one task: ``"auto"`` shares this process's cores among the tasks it runs at once."""
    if threads is None or isinstance(threads, int):
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    concurrent = 1
    try:
        from distributed import get_worker

        concurrent = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        if threading.current_thread() is not threading.main_thread():  # dask's threaded scheduler
            import dask
            from dask.system import CPU_COUNT

            concurrent = dask.config.get("num_workers", None) or CPU_COUNT
    return max(1, min(torch.get_num_threads(), cores // max(1, concurrent)))


def _feature_tile(features: Tensor, out: Sequence[int], crops: Sequence[tuple[int, int]]) -> Tensor:
    """The owned features placed in a tile's output grid; zeros where the tile's outputs are cropped away."""
    tile = features.new_zeros((*features.shape[:2], *out))
    index = (slice(None), slice(None), *(slice(a, b) for a, b in crops))
    tile[index] = features
    return tile


def _run_tile(block: Any, *rest: Any, tiles: _Tiles, block_id: tuple[int, ...] = ()) -> Any:
    """One task: the module on one overlapped block, cropped to the outputs the block owns."""
    import numpy as np

    *side_blocks, module = rest
    spatial_ids = block_id[2:]
    starts = [tiles.starts[a][i] for a, i in enumerate(spatial_ids)]
    crops = [tiles.crops[a][i] for a, i in enumerate(spatial_ids)]
    threads = _task_threads(tiles.threads)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        module = _on_device(module, tiles.device)
        device = tiles.device or next((p.device for p in module.parameters()), torch.device("cpu"))

        def tensor(a: Any) -> Tensor:
            return torch.from_numpy(np.require(a, requirements=["C", "W"])).to(device)

        y = tensor(block)
        sides = dict(zip(tiles.sides, (tensor(b) for b in side_blocks)))
        model = analyse(module, tiles.ndim, halo=tiles.halo, stride=tiles.stride)  # the modules of this process
        frames = model.field.input_frames()
        with torch.inference_mode():
            for i, step in enumerate(model.steps):
                kwargs = {}
                if "guide" in step.takes:
                    kwargs["guide"] = sides["guide"]
                if "features" in step.takes:
                    out = step.geometry.out_size(y.shape[2:])
                    assert out is not None
                    kwargs["features"] = _feature_tile(sides["features"], out, crops)
                if "positions" in step.takes:
                    origin = tuple(s // j for s, j in zip(starts, frames[i]))
                    with position_frame(tuple(y.shape[2:]), origin, tiles.whole[i]):
                        y = step.module(y, **kwargs)
                else:
                    size = tuple(y.shape[2:])
                    y = step.module(y, **kwargs)
                    expected = step.geometry.out_size(size)
                    if step.declared and tuple(y.shape[2:]) != expected:
                        raise ValueError(
                            f"The module of declared geometry (halo=, stride=) mapped a tile of spatial size "
                            f"{size} to {tuple(y.shape[2:])}; expected {expected}, ceil(size / stride) per axis."
                        )
            owned = (slice(None), slice(None), *(slice(a, b) for a, b in crops))
            y = y[owned]
            return y.cpu().numpy()
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def _probe(model: TileModel, plan: TilePlan, module: nn.Module, dtype: Any, sides: dict[str, Any]) -> Tensor:
    """Run the module once on the smallest tile it accepts, before any work: channels, dtype, side inputs."""
    import numpy as np

    field = model.field
    size = []
    for a, t in enumerate(plan.axes):
        size.append(min(t.stops[0] - t.starts[0], field.size[a] + 2 * field.stride[a] + 4))
    if field.out_shape(size) is None:
        size = [t.stops[0] - t.starts[0] for t in plan.axes]
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    torch_dtype = torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
    y = torch.zeros((1, plan.shape[1], *size), dtype=torch_dtype, device=device)
    with torch.inference_mode():
        for step in model.steps:
            kwargs = {}
            if "guide" in step.takes:
                kwargs["guide"] = torch.zeros((1, sides["guide"].shape[1], *size), dtype=torch_dtype, device=device)
            if "features" in step.takes:
                out = step.geometry.out_size(y.shape[2:])
                assert out is not None
                kwargs["features"] = torch.zeros(
                    (1, sides["features"].shape[1], *out), dtype=torch_dtype, device=device
                )
            y = step.module(y, **kwargs)
    return y


def tiled(
    module: nn.Module,
    x: Any,
    *,
    guide: Any = None,
    features: Any = None,
    halo: object = None,
    stride: object = None,
    device: torch.device | str | None = None,
    threads: int | str | None = "auto",
) -> Any:
    """Run ``module`` over a Dask array tile by tile, with the same numbers as ``module(x)`` in memory.

    Every chunk of ``x`` becomes one task: the chunk, extended by the module's halo (see
    :func:`~chunkconv.receptive_field`), runs through the module, which pads the real border
    itself, and the outputs the chunk owns are kept. The result equals the in-memory module's up
    to floating-point rounding for any chunking. Lazy: nothing runs until the result is computed
    (or stored, e.g. ``.to_zarr(...)``), on whichever Dask scheduler is active. Inference only.

    Args:
        module: ``nn.Conv1d/2d/3d``, chunkconv's layers (any form; side inputs below),
            ``MaxPool``/``AvgPool`` (without ``ceil_mode``), pointwise layers (activations,
            ``Dropout`` and ``BatchNorm`` in eval, ``Identity``), or an ``nn.Sequential`` of them.
            Anything else raises :class:`~chunkconv.tile_layers.NotTileLocalError` unless its
            geometry is declared with ``halo``/``stride``.
        x: a Dask array ``(N, C, *spatial)`` of floats (1 to 3 spatial axes); the channel axis is
            made one chunk, spatial chunk starts moved to multiples of the total stride and
            chunks smaller than the halo merged (see :func:`tile_plan`).
        guide: a Dask array ``(N, G, *spatial)`` for the layer whose ``inputs`` name ``"guide"``
            (it must see the module's input: only pointwise layers before it), overlapped like
            ``x``. Default: ``None``.
        features: a Dask array ``(N, F, *out_spatial)`` at the output's resolution, for the layer
            whose ``inputs`` name ``"features"`` (only pointwise layers after it). Default: ``None``.
        halo: declare the geometry of a module chunkconv cannot read: an int, one per axis or
            ``(before, after)`` per axis; the module must map an input of ``n`` to
            ``ceil(n / stride)`` outputs per axis. Default: ``None``.
        stride: with ``halo``, the module's total stride. Default: ``None`` (1).
        device: where tasks run the module (a copy is moved there once per process); results
            come back as host (NumPy) blocks. Default: ``None`` (where the module is).
        threads: torch threads per task: ``"auto"`` shares a process's cores among the tasks it
            runs at once (a distributed worker's threads; the threaded scheduler's pool, one
            thread per core unless Dask's ``num_workers`` config says otherwise; one task at a
            time on the synchronous scheduler), never more than torch has; an int; or ``None``
            to leave torch's setting. Default: ``"auto"``.

    Returns:
        A Dask array ``(N, C_out, *out_spatial)``, chunked as :func:`tile_plan` says.

    Raises:
        NotTileLocalError: a layer that is not tile-local, named, with the reason.
        TypeError: ``x`` or a side input is not a Dask array.
        ValueError: shapes that do not fit the module, or a side input the module does not take.

    Examples:
        >>> import dask.array as da, numpy as np, torch, chunkconv
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1, dtype=torch.float64), torch.nn.ReLU())
        >>> x = da.from_array(np.random.rand(1, 1, 40, 40), chunks=(1, 1, 16, 16))
        >>> y = chunkconv.tiled(net, x)
        >>> bool(np.allclose(y.compute(), net(torch.from_numpy(x.compute())).detach().numpy()))
        True

    """
    da = _dask()
    import numpy as np

    x = _check_array(x, "x")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"Expected a floating-point input, got dtype {x.dtype}; convert it with x.astype(...).")
    model = analyse(module, x.ndim - 2, halo=halo, stride=stride)
    given = {"guide": guide, "features": features}
    for kind, value in given.items():
        if model.takes(kind) and value is None:
            name = model.steps[model.takes(kind)[0]].name
            raise ValueError(f"Layer {name!r} reads {kind!r} (its `inputs`), so tiled() needs {kind}=, got None.")
        if value is not None and not model.takes(kind):
            raise ValueError(f"Got {kind}=, but no layer of the module names {kind!r} in its `inputs`.")
        if value is not None:
            _check_array(value, kind, x.ndim)
    plan = model.field.tile_plan(x.shape, x.chunks)
    sizes = model.field.sizes(x.shape[2:])
    assert sizes is not None
    if guide is not None and (guide.shape[0], *guide.shape[2:]) != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"Expected a guide (N, G, *spatial) with the input's N and spatial size {(x.shape[0], *x.shape[2:])}, "
            f"got shape {guide.shape}."
        )
    if features is not None and (features.shape[0], *features.shape[2:]) != (x.shape[0], *plan.out_shape):
        raise ValueError(
            f"Expected features (N, F, *out_spatial) with N and the output's spatial size "
            f"{(x.shape[0], *plan.out_shape)}, got shape {features.shape}."
        )
    probe = _probe(model, plan, module, x.dtype, given)
    out_channels = probe.shape[1]
    out_dtype = probe.cpu().numpy().dtype

    x = x.rechunk(plan.chunks) if x.chunks != plan.chunks else x
    # an axis of one chunk needs no overlap (and dask refuses a depth beyond the array)
    depth = {2 + a: h if len(c) > 1 else (0, 0) for a, (h, c) in enumerate(zip(plan.halo, plan.chunks[2:]))}
    needs_overlap = any(b or a for b, a in depth.values())

    def overlapped(a: Any) -> Any:
        return da.overlap.overlap(a, depth=depth, boundary={k: "none" for k in depth}) if needs_overlap else a

    arrays = [overlapped(x)]
    sides = []
    if guide is not None:
        g = guide.rechunk((plan.chunks[0], (guide.shape[1],), *plan.chunks[2:]))
        arrays.append(overlapped(g))
        sides.append("guide")
    if features is not None:
        arrays.append(features.rechunk((plan.chunks[0], (features.shape[1],), *plan.out_chunks)))
        sides.append("features")
    tiles = _Tiles(
        ndim=x.ndim - 2,
        halo=halo,
        stride=stride,
        starts=tuple(t.starts for t in plan.axes),
        crops=tuple(t.crops for t in plan.axes),
        whole=tuple(sizes[:-1]),
        sides=tuple(sides),
        device=None if device is None else str(torch.device(device)),
        threads=threads,
    )
    import dask

    # One key in the graph, not a copy per task. Named, not hashed: hashing would pickle the
    # whole module (and round-trip it, which rebinds the globals of classes defined in __main__).
    shipped = dask.delayed(module, name=f"chunkconv-module-{uuid.uuid4().hex}", traverse=False)
    return da.map_blocks(
        _run_tile,
        *arrays,
        shipped,
        tiles=tiles,
        chunks=(plan.chunks[0], (out_channels,), *plan.out_chunks),
        dtype=out_dtype,
        meta=np.empty((0,) * x.ndim, dtype=out_dtype),
        token="chunkconv-tiled",
    )
