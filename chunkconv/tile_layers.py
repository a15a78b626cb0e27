"""Which layers tile exactly, and their geometry: an ``nn.Module`` read as a stack of :class:`LayerGeometry`.

Reads only the layers' public attributes (``kernel_size``, ``stride``, ``padding``, ``dilation``,
``padding_mode``, ``training``...): no tensors, no Dask. A module is a stack of steps
(``nn.Sequential`` flattened), each a convolution (``nn.Conv1d/2d/3d`` or chunkconv's layers), a
pooling layer (``MaxPool``, ``AvgPool``) or a pointwise layer (activations, ``Dropout`` and
``BatchNorm`` in eval, ``Identity``). Anything else is refused with :class:`NotTileLocalError`,
naming the layer and why its outputs are not a function of a bounded window of the input; a
user may instead declare the whole module's geometry (``halo=``, ``stride=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .errors import ChunkConvError
from .geometry import check_ntuple
from .halo import LayerGeometry, ReceptiveField, compose, pointwise
from .modules import DynamicConv

__all__ = ["NotTileLocalError", "Step", "TileModel", "analyse", "receptive_field"]


class NotTileLocalError(ChunkConvError, ValueError):
    """A module whose outputs do not depend on a bounded window of its input, so tiles cannot be exact."""


@dataclass(frozen=True)
class Step:
    """One layer of the stack: the module to call and its geometry.

    ``takes``: the side inputs and frame the layer reads (``"guide"``, ``"features"``, ``"positions"``).
    """

    name: str
    module: nn.Module
    geometry: LayerGeometry
    takes: tuple[str, ...] = ()
    declared: bool = False


@dataclass(frozen=True)
class TileModel:
    """A module read as a stack of steps, with its receptive field."""

    steps: tuple[Step, ...]
    field: ReceptiveField

    def takes(self, kind: str) -> list[int]:
        """The indices of the steps that read ``kind``."""
        return [i for i, s in enumerate(self.steps) if kind in s.takes]


_POINTWISE = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.Hardshrink,
    nn.Softshrink,
)
_CONVS: dict[type, int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_MAXPOOLS: dict[type, int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVGPOOLS: dict[type, int] = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}


def _refuse(name: str, module: nn.Module, why: str) -> NotTileLocalError:
    return NotTileLocalError(f"Cannot tile layer {name!r} ({type(module).__name__}): {why}.")


def _pads(
    padding: object, kernel: tuple[int, ...], dilation: tuple[int, ...], ndim: int
) -> tuple[tuple[int, int], ...]:
    if padding == "valid":
        return ((0, 0),) * ndim
    if padding == "same":
        return tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation))
    return tuple((p, p) for p in check_ntuple(padding, ndim, "padding", minimum=0))


def _conv_geometry(name: str, module: nn.Module, ndim: int, padding_mode: str) -> LayerGeometry:
    kernel = check_ntuple(module.kernel_size, ndim, "kernel_size")
    stride = check_ntuple(module.stride, ndim, "stride")
    dilation = check_ntuple(module.dilation, ndim, "dilation")
    if padding_mode == "circular":
        raise _refuse(name, module, "padding_mode='circular' wraps each border around to the opposite one")
    pads = _pads(module.padding, kernel, dilation, ndim)
    # reflect padding p needs p + 1 elements (the border is not repeated); replicate needs one
    least = tuple(max(p) + 1 if padding_mode == "reflect" else 1 for p in pads)
    return LayerGeometry(_label(name, module), kernel, stride, dilation, pads, least)


def _pool_geometry(name: str, module: nn.Module, ndim: int, *, dilation: bool) -> LayerGeometry:
    if module.ceil_mode:
        raise _refuse(name, module, "ceil_mode=True adds a last window whose presence depends on the whole size")
    if getattr(module, "return_indices", False):
        raise _refuse(name, module, "return_indices=True returns indices into the tile, not the whole input")
    kernel = check_ntuple(module.kernel_size, ndim, "kernel_size")
    stride = check_ntuple(module.stride if module.stride is not None else kernel, ndim, "stride")
    dil = check_ntuple(module.dilation, ndim, "dilation") if dilation else (1,) * ndim
    pads = tuple((p, p) for p in check_ntuple(module.padding, ndim, "padding", minimum=0))
    least = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dil))  # torch's 3-D pools refuse smaller inputs
    return LayerGeometry(_label(name, module), kernel, stride, dil, pads, least)


def _label(name: str, module: nn.Module) -> str:
    return f"{name} ({type(module).__name__})" if name != type(module).__name__ else name


def _ndim_of(name: str, module: nn.Module, have: int, want: int) -> None:
    if have != want:
        raise _refuse(name, module, f"it runs over {have} spatial axes, but the input has {want}")


def _step(name: str, module: nn.Module, ndim: int) -> Step:
    """One leaf layer as a :class:`Step`, or the refusal that says why it is not tile-local."""
    if isinstance(module, DynamicConv):
        _ndim_of(name, module, len(module.kernel_size), ndim)
        if module.allow_batch_coupled:
            raise _refuse(
                name,
                module,
                "allow_batch_coupled=True: its generator's rows interact, so its outputs depend on which "
                "locations share a tile",
            )
        geometry = _conv_geometry(name, module, ndim, module.padding_mode)
        takes = tuple(k for k in ("guide", "features", "positions") if k in module.inputs)
        return Step(name, module, geometry, takes)
    if type(module) in _CONVS:
        _ndim_of(name, module, _CONVS[type(module)], ndim)
        return Step(name, module, _conv_geometry(name, module, ndim, str(module.padding_mode)))
    if type(module) in _MAXPOOLS:
        _ndim_of(name, module, _MAXPOOLS[type(module)], ndim)
        return Step(name, module, _pool_geometry(name, module, ndim, dilation=True))
    if type(module) in _AVGPOOLS:
        _ndim_of(name, module, _AVGPOOLS[type(module)], ndim)
        return Step(name, module, _pool_geometry(name, module, ndim, dilation=False))
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None:
            raise _refuse(
                name,
                module,
                "in training mode (or without running statistics) BatchNorm normalises by the statistics of "
                "the batch, which a tile does not have; call .eval() first",
            )
        return Step(name, module, pointwise(_label(name, module), ndim))
    if isinstance(module, nn.modules.dropout._DropoutNd):
        if module.training:
            raise _refuse(name, module, "in training mode Dropout draws random masks per call; call .eval() first")
        return Step(name, module, pointwise(_label(name, module), ndim))
    if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        if module.dim != 1:
            raise _refuse(name, module, f"dim={module.dim} normalises across positions, not only channels (dim=1)")
        return Step(name, module, pointwise(_label(name, module), ndim))
    if isinstance(module, _POINTWISE):
        return Step(name, module, pointwise(_label(name, module), ndim))
    raise _refuse(name, module, _why_not(module))


def _why_not(module: nn.Module) -> str:
    """Why a layer that is not a known tile-local one is refused."""
    if isinstance(module, (nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)):
        return "it normalises by statistics over the spatial axes, which a tile sees only part of"
    if isinstance(module, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        return "adaptive pooling's windows are fractions of the whole input, so they depend on its size"
    if isinstance(module, (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerEncoder)):
        return "attention mixes every position with every other"
    if isinstance(module, nn.Upsample):
        if module.align_corners:
            return "align_corners=True places its samples by the whole input's size, which a tile does not have"
        return "upsampling has a fractional stride, which tiles aligned to integer strides do not cover"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolutions have a fractional stride, which tiles aligned to integer strides do not cover"
    return (
        "chunkconv cannot see which inputs each of its outputs reads; if it is tile-local, declare the "
        "whole module's geometry with halo= and stride="
    )


def _leaves(module: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    if type(module) is nn.Sequential:
        out = []
        for child_name, child in module.named_children():
            out += _leaves(child, f"{name}.{child_name}" if name else child_name)
        return out
    return [(name or type(module).__name__, module)]


def _declared(module: nn.Module, ndim: int, halo: object, stride: object) -> Step:
    """The whole module as one step of the declared geometry (see :func:`analyse`)."""
    s = check_ntuple(1 if stride is None else stride, ndim, "stride")
    if isinstance(halo, int) or halo is None:
        pairs = [(0 if halo is None else halo,) * 2] * ndim
    elif isinstance(halo, Sequence) and len(halo) == ndim and all(isinstance(h, Sequence) for h in halo):
        pairs = [tuple(h) for h in halo]
    else:
        pairs = [(h, h) for h in check_ntuple(halo, ndim, "halo", minimum=0)]
    if any(len(p) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in p) for p in pairs):
        raise ValueError(
            f"Invalid value for `halo`; expected an int, {ndim} ints or {ndim} (before, after) pairs of ints >= 0, "
            f"got halo={halo!r}."
        )
    for name, inner in module.named_modules():
        if isinstance(inner, DynamicConv) and "positions" in inner.inputs:
            raise _refuse(
                name or type(module).__name__,
                inner,
                "inside a module of declared geometry, its positions would be the tile's, not the whole "
                "input's; use an nn.Sequential chunkconv can read",
            )
    kernel = tuple(b + a + st for (b, a), st in zip(pairs, s))
    # output o reads [o S - before, (o + 1) S + after): a convolution of that kernel, padded so
    # that an input of n gives ceil(n / S) outputs
    pads = tuple((b, k - 1 - b) for (b, _), k in zip(pairs, kernel))
    geometry = LayerGeometry(type(module).__name__, kernel, s, (1,) * ndim, pads)
    return Step(type(module).__name__, module, geometry, declared=True)


def analyse(module: nn.Module, ndim: int, *, halo: object = None, stride: object = None) -> TileModel:
    """Read ``module`` as a stack of tile-local steps over ``ndim`` spatial axes.

    With ``halo`` or ``stride`` the module is not read: it is one step whose output ``o`` reads
    the inputs ``[o S - before, (o + 1) S + after)`` and which maps an input of ``n`` to
    ``ceil(n / S)`` outputs (as a ``"same"``-padded network of total stride ``S`` does).

    Raises:
        NotTileLocalError: a layer that is not tile-local (named, with the reason).
        TypeError: ``module`` is not an ``nn.Module``.

    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Invalid type for `module`; expected an nn.Module, got {type(module).__name__}.")
    if ndim not in (1, 2, 3):
        raise ValueError(f"Invalid value for `ndim`; expected 1, 2 or 3 spatial axes, got ndim={ndim!r}.")
    if halo is not None or stride is not None:
        steps = [_declared(module, ndim, halo, stride)]
    else:
        steps = [_step(name, leaf, ndim) for name, leaf in _leaves(module, "")]
    field = compose([s.geometry for s in steps], ndim)
    for i, step in enumerate(steps):
        if "guide" in step.takes and not all(s.geometry.is_pointwise for s in steps[:i]):
            raise _refuse(
                step.name,
                step.module,
                "a guide is windowed like the layer's input, so tiled() takes it only for a layer that sees the "
                "module's input (only pointwise layers before it)",
            )
        if "features" in step.takes and not all(s.geometry.is_pointwise for s in steps[i + 1 :]):
            raise _refuse(
                step.name,
                step.module,
                "features are given at the layer's output resolution, so tiled() takes them only for a layer "
                "whose output is the module's (only pointwise layers after it)",
            )
    return TileModel(tuple(steps), field)


def receptive_field(module: nn.Module, ndim: int, *, halo: object = None, stride: object = None) -> ReceptiveField:
    """The receptive field of ``module`` over ``ndim`` spatial axes, and the halo a tile needs.

    Per axis the total stride ``S = prod s_l``, the effective left padding
    ``P = sum p_l j_{l-1}`` and the receptive field ``r = 1 + sum d_l (k_l - 1) j_{l-1}``
    (``j_l = s_1 ... s_l``); a tile needs ``S * ceil(P / S)`` inputs before the chunk it owns
    and ``max(0, r - P - S)`` after. Pure arithmetic on the layers' attributes; print the
    result for a table.

    Args:
        module: ``nn.Conv1d/2d/3d``, chunkconv's layers, ``MaxPool``/``AvgPool`` (without
            ``ceil_mode``), pointwise layers, or an ``nn.Sequential`` of them.
        ndim: the number of spatial axes (1, 2 or 3).
        halo: declare the geometry of a module chunkconv cannot read: an int, one int per axis or
            ``(before, after)`` per axis. Default: ``None`` (read the module).
        stride: with ``halo``, the module's total stride. Default: ``None`` (1).

    Returns:
        A :class:`~chunkconv.halo.ReceptiveField`; ``.tile_plan(shape, chunks)`` plans tiles.

    Raises:
        NotTileLocalError: a layer whose outputs are not a function of a bounded window.

    Examples:
        >>> import torch, chunkconv
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        >>> rf = chunkconv.receptive_field(net, 2)
        >>> rf.stride, rf.padding, rf.size, rf.halo
        ((2, 2), (1, 1), (4, 4), ((2, 1), (2, 1)))

    """
    return analyse(module, ndim, halo=halo, stride=stride).field
