"""Convolution geometry: argument checking, padding amounts and output sizes.

Pure Python, no tensors. Everything the planner and the executor need to know
about *where* patches are is computed here once, from the same arguments
``torch.nn.Conv*d`` takes, into a frozen :class:`ConvGeometry`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PADDING_MODES",
    "ConvGeometry",
    "ConvSpec",
    "check_ntuple",
    "conv_geometry",
    "conv_spec",
    "conv_spec_for_input",
    "output_size",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def check_ntuple(value: object, n: int, name: str, *, minimum: int = 1) -> tuple[int, ...]:
    """Normalise an int or a length-``n`` sequence of ints to a checked tuple.

    Stricter than torch's ``_ntuple``: the length must be ``n`` and every entry
    an int ``>= minimum`` (bools are rejected).

    Raises:
        TypeError: ``value`` is neither an int nor a sequence of ints.
        ValueError: wrong length or an entry below ``minimum``.

    """
    expected = f"an int or a tuple of {n} ints >= {minimum}"
    if isinstance(value, bool):
        raise TypeError(f"Invalid type for `{name}`; expected {expected}, got {name}={value!r}.")
    if isinstance(value, int):
        items: tuple[object, ...] = (value,) * n
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
    else:
        raise TypeError(f"Invalid type for `{name}`; expected {expected}, got {name}={value!r}.")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise TypeError(f"Invalid type for `{name}`; expected {expected}, got {name}={value!r}.")
    if len(items) != n or any(v < minimum for v in items):  # type: ignore[operator]
        raise ValueError(f"Invalid value for `{name}`; expected {expected}, got {name}={value!r}.")
    return items  # type: ignore[return-value]


def output_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    """Torch's convolution output-size formula for one spatial dimension."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class ConvGeometry:
    """Where every patch of one input shape lies.

    Attributes:
        kernel_size, stride, dilation: per spatial dimension.
        pads: ``(left, right)`` padding per spatial dimension (asymmetric for
            ``padding="same"`` with an even receptive field, as in torch).
        padding_mode: one of :data:`PADDING_MODES`.
        in_channels, out_channels, groups: as for ``nn.Conv*d``.
        batch: N (1 for unbatched input).
        in_spatial: spatial size of the (unpadded) input.
        padded_spatial: spatial size after padding.
        out_spatial: spatial size of the output.

    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    padding_mode: str
    in_channels: int
    out_channels: int
    groups: int
    batch: int
    in_spatial: tuple[int, ...]
    padded_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return len(self.kernel_size)

    @property
    def kernel_numel(self) -> int:
        """Taps per channel: ``prod(kernel_size)``."""
        return math.prod(self.kernel_size)

    @property
    def patch_size(self) -> int:
        """Features of one patch row: ``C * prod(kernel_size)``."""
        return self.in_channels * self.kernel_numel

    @property
    def weight_numel(self) -> int:
        """Entries of one patch's weight: ``out * (C // groups) * prod(kernel_size)``."""
        return self.out_channels * (self.in_channels // self.groups) * self.kernel_numel

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """One patch's weight as ``F.conv*d`` takes it: ``(out, C // groups, *kernel_size)``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def locations_per_image(self) -> int:
        """L: output locations (patches) of one image."""
        return math.prod(self.out_spatial)

    @property
    def num_patches(self) -> int:
        """N * L: the patch dimension chunks are taken over."""
        return self.batch * self.locations_per_image

    @property
    def torch_pad(self) -> tuple[int, ...]:
        """The padding as ``F.pad`` takes it (last dimension first)."""
        return tuple(p for pair in reversed(self.pads) for p in pair)

    @property
    def is_padded(self) -> bool:
        """Whether any side is padded."""
        return any(p for pair in self.pads for p in pair)


def conv_geometry(
    input_shape: Sequence[int],
    *,
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    groups: int,
    padding_mode: str,
) -> ConvGeometry:
    """Check one batched input shape ``(N, C, *spatial)`` against the arguments.

    The per-dimension arguments must already be normalised tuples (see
    :func:`check_ntuple`); ``padding`` may also be ``"same"`` or ``"valid"``.

    Raises:
        ValueError: channel mismatch, a kernel larger than the padded input, or
            padding that ``padding_mode`` cannot produce.

    """
    d = len(kernel_size)
    if len(input_shape) != d + 2:
        raise ValueError(f"Expected a batched input of {d + 2} dims (N, C, *spatial), got shape {tuple(input_shape)}.")
    batch, channels, *spatial = (int(s) for s in input_shape)
    if channels != in_channels:
        raise ValueError(
            f"Expected input with {in_channels} channels (in_channels={in_channels}), "
            f"got {channels} channels in input of shape {tuple(input_shape)}."
        )
    if padding == "valid":
        pads = tuple((0, 0) for _ in range(d))
    elif padding == "same":
        pads = tuple((dil * (k - 1) // 2, dil * (k - 1) - dil * (k - 1) // 2) for k, dil in zip(kernel_size, dilation))
    else:
        assert not isinstance(padding, str), padding
        pads = tuple((p, p) for p in padding)

    if padding_mode in ("reflect", "circular"):
        for axis, (size, (left, right)) in enumerate(zip(spatial, pads)):
            limit = size - 1 if padding_mode == "reflect" else size
            if max(left, right) > limit:
                raise ValueError(
                    f"padding_mode={padding_mode!r} needs padding "
                    f"{'<' if padding_mode == 'reflect' else '<='} the input size, but spatial "
                    f"dimension {axis} has size {size} and padding {(left, right)}."
                )

    padded = tuple(s + left + right for s, (left, right) in zip(spatial, pads))
    out = tuple(output_size(s, k, st, 0, dil) for s, k, st, dil in zip(padded, kernel_size, stride, dilation))
    if any(o < 1 for o in out):
        receptive = tuple(dil * (k - 1) + 1 for k, dil in zip(kernel_size, dilation))
        raise ValueError(
            f"Kernel larger than the padded input: the receptive field {receptive} "
            f"(kernel_size={kernel_size}, dilation={dilation}) does not fit in the padded "
            f"spatial size {padded} (input {tuple(spatial)}, padding {pads})."
        )
    return ConvGeometry(
        kernel_size=kernel_size,
        stride=stride,
        dilation=dilation,
        pads=pads,
        padding_mode=padding_mode,
        in_channels=in_channels,
        out_channels=out_channels,
        groups=groups,
        batch=batch,
        in_spatial=tuple(spatial),
        padded_spatial=padded,
        out_spatial=out,
    )


@dataclass(frozen=True)
class ConvSpec:
    """The checked, shape-independent arguments of one dynamic convolution."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str

    @property
    def ndim(self) -> int:
        """The number of spatial dimensions."""
        return len(self.kernel_size)

    def geometry(self, input_shape: Sequence[int]) -> ConvGeometry:
        """The :class:`ConvGeometry` of one batched input shape."""
        return conv_geometry(
            input_shape,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid type for `{name}`; expected an int >= 1, got {name}={value!r}.")
    if value < 1:
        raise ValueError(f"Invalid value for `{name}`; expected an int >= 1, got {name}={value!r}.")
    return value


def conv_spec(
    ndim: int | None,
    *,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> ConvSpec:
    """Check ``nn.Conv*d``-style arguments once, before any tensor is touched.

    Args:
        ndim: number of spatial dimensions (1, 2 or 3), or ``None`` to take it
            from ``len(kernel_size)`` (an int ``kernel_size`` then means 2-D).

    Raises:
        TypeError, ValueError: with the argument, what was expected and what was got.

    """
    in_channels = _check_positive_int(in_channels, "in_channels")
    out_channels = _check_positive_int(out_channels, "out_channels")
    groups = _check_positive_int(groups, "groups")
    if ndim is None:
        if isinstance(kernel_size, Sequence) and not isinstance(kernel_size, str):
            ndim = len(kernel_size)
        else:
            ndim = 2
    if ndim not in (1, 2, 3):
        raise ValueError(
            f"Invalid value for `kernel_size`; expected 1, 2 or 3 spatial dimensions, got kernel_size={kernel_size!r}."
        )
    kernel = check_ntuple(kernel_size, ndim, "kernel_size")
    strides = check_ntuple(stride, ndim, "stride")
    dilations = check_ntuple(dilation, ndim, "dilation")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(
                f"Invalid value for `padding`; expected 'same', 'valid', an int or a tuple of "
                f"{ndim} ints >= 0, got padding={padding!r}."
            )
        if padding == "same" and any(s != 1 for s in strides):
            raise ValueError(
                f"padding='same' is not supported for strided convolutions; expected stride=1, got stride={stride!r}."
            )
        pad: tuple[int, ...] | str = padding
    else:
        pad = check_ntuple(padding, ndim, "padding", minimum=0)
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"Invalid value for `padding_mode`; expected one of {PADDING_MODES}, got padding_mode={padding_mode!r}."
        )
    for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
        if channels % groups:
            raise ValueError(f"`{name}` must be divisible by `groups`; got {name}={channels}, groups={groups}.")
    return ConvSpec(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel,
        stride=strides,
        padding=pad,
        dilation=dilations,
        groups=groups,
        padding_mode=padding_mode,
    )


def conv_spec_for_input(
    shape: Sequence[int],
    ndim: int | None,
    out_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int] | str,
    dilation: int | Sequence[int],
    groups: int,
    padding_mode: str,
    op: str,
) -> ConvSpec:
    """The spec of a functional call: ``in_channels`` is read off the input's shape.

    ``ndim`` ``None`` takes the number of spatial dims from ``kernel_size`` (an int means 2-D);
    ``op`` names the caller in the error for an input of the wrong number of dims.
    """
    d = ndim if ndim is not None else (len(kernel_size) if isinstance(kernel_size, Sequence) else 2)
    if len(shape) not in (d + 1, d + 2):
        raise ValueError(
            f"Expected {d + 1}-D (unbatched) or {d + 2}-D (batched) input to {op}, got input of shape {tuple(shape)}."
        )
    return conv_spec(
        d,
        in_channels=int(shape[0 if len(shape) == d + 1 else 1]),
        out_channels=out_channels,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
