"""Drop-in deformable convolutions, run by chunkconv's engine under a memory budget.

Each op is a call of the engine (:func:`chunkconv.functional.apply_spec`) with ``offsets=``, so
the sampled patch columns that torchvision and mmcv materialise for the whole input are gathered
chunk by chunk, and backward recomputes them:

* :func:`deform_conv2d` is torchvision's ``deform_conv2d`` (same signature, semantics and
  gradient rule): the sampled (and masked) patches contracted with the layer's weight, i.e. the
  ``kernel="modulated"`` form with per-tap scalars of one and the weight as its static weight
  (DCNv2; DCNv1 without a mask). :func:`deform_conv1d` and :func:`deform_conv3d` are the same
  in one and three spatial dims, with the same offset layout.
* :class:`DeformConv1d`, :class:`DeformConv2d`, :class:`DeformConv3d` hold ``weight`` and
  ``bias`` as torchvision's ``DeformConv2d`` (same names, shapes and initialisation, so its
  ``state_dict`` loads).
* :func:`dcnv3_core` is InternImage's DCNv3 core op and :func:`dcnv4_core` DCNv4's (offsets and
  mask packed): the ``kernel="shared"`` form (one kernel per group, depthwise, no weight) with
  kernels of one, the mask inside the sampled patches, and the strict border rule.

Every op also takes chunkconv's ``budget=`` and ``chunk_size=`` keywords, after the originals'
arguments. float64, float32, float16 and bfloat16 run on the CPU and on CUDA; under
``torch.autocast`` the contraction runs in autocast's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .call import Budget, CallOptions
from .functional import apply_spec
from .geometry import check_ntuple, conv_spec, output_size
from .sampling import dcnv3_offsets, dcnv4_offsets

__all__ = [
    "DeformConv1d",
    "DeformConv2d",
    "DeformConv3d",
    "dcnv3_core",
    "dcnv4_core",
    "deform_conv1d",
    "deform_conv2d",
    "deform_conv3d",
]


class _Ones(nn.Module):
    """A generator of ones, ``(B, width)``: per-tap scalars (or kernels) that leave the samples as they are.

    One instance per width (:func:`_ones`), so that the engine's plans, cached per generator,
    serve every call of an op.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, rows: Tensor) -> Tensor:
        return rows.new_ones(1, 1).expand(rows.shape[0], self.width)

    def extra_repr(self) -> str:
        return f"width={self.width}"


_ONES: dict[int, _Ones] = {}


def _ones(width: int) -> _Ones:
    found = _ONES.get(width)
    if found is None:
        found = _ONES[width] = _Ones(width)
    return found


_DEFORM_DOC = """{ndim}-D deformable convolution: torchvision's ``deform_conv2d`` semantics{dims_note}, chunked.

    Tap ``t`` of output location ``o`` reads the input at ``o * stride - padding + tap_t *
    dilation + offset`` (pixel units, multilinear interpolation, zero outside), is scaled by
    ``mask`` when given, and the weight contracts the sampled patch, as torchvision's op computes
    it; the offsets' gradient follows torchvision's rule (one-sided from the right at integer
    positions). The sampled columns are gathered per chunk, never for the whole input.

    Args:
        input: ``(N, C_in, {spatial})``.
        offset: ``(N, G * K * {ndim}, *out)``, ``K = prod(kernel_size)``: per offset group ``g``
            (input channels ``[g * C_in / G, (g + 1) * C_in / G)``) and tap (``F.unfold``'s
            order), the displacement per spatial axis, slowest axis first{axes_note}.
        weight: ``(C_out, C_in // groups, *kernel_size)``; ``groups = C_in // weight.shape[1]``.
        bias: ``(C_out,)`` or None. Default: ``None``.
        stride: an int or one per spatial dim. Default: ``1``.
        padding: an int or one per spatial dim (zeros). Default: ``0``.
        dilation: an int or one per spatial dim. Default: ``1``.
        mask: ``(N, G * K, *out)`` or None (DCNv1). Default: ``None``.
        budget: chunkconv's memory budget of the call (``"1GB"``, bytes, a fraction, ``"auto"``).
            Default: ``"auto"``.
        chunk_size: output locations per chunk, overriding the budget. Default: ``None``.

    Returns:
        ``(N, C_out, *out)``, ``out = floor((in + 2 * padding - dilation * (k - 1) - 1) / stride) + 1``.

    Raises:
        ValueError, TypeError: shapes or types that do not fit, before any work.
        BudgetTooSmallError: not even one location per chunk fits ``budget``.
"""


def _deform_conv(ndim: int, op: str) -> Callable[..., Tensor]:
    def deform_conv(
        input: Tensor,
        offset: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        mask: Tensor | None = None,
        *,
        budget: Budget = "auto",
        chunk_size: int | None = None,
    ) -> Tensor:
        for name, t in (("input", input), ("offset", offset), ("weight", weight)):
            if not isinstance(t, Tensor):
                raise TypeError(f"Invalid type for `{name}` of {op}; expected a Tensor, got {type(t).__name__}.")
        if input.dim() != ndim + 2 or weight.dim() != ndim + 2:
            raise ValueError(
                f"{op} expects a batched input (N, C, *{ndim} spatial dims) and a weight (C_out, C_in // groups, "
                f"*kernel_size), both {ndim + 2}-D; got input {tuple(input.shape)} and weight {tuple(weight.shape)}."
            )
        in_channels, per_group = input.shape[1], weight.shape[1]
        if per_group < 1 or in_channels % per_group:
            raise ValueError(
                f"Invalid shape for `weight` of {op}; expected weight.shape[1] (C_in // groups) to divide the "
                f"input's {in_channels} channels, got weight of shape {tuple(weight.shape)}."
            )
        kernel = tuple(weight.shape[2:])
        spec = conv_spec(
            ndim,
            in_channels=in_channels,
            out_channels=weight.shape[0],
            kernel_size=kernel,
            stride=stride,
            padding=check_ntuple(padding, ndim, "padding", minimum=0),
            dilation=dilation,
            groups=in_channels // per_group,
        )
        options = CallOptions(budget=budget, chunk_size=chunk_size, kernel="modulated")
        return apply_spec(
            input,
            _ones(math.prod(kernel)),
            spec,
            bias,
            options,
            op=op,
            weight=weight,
            offsets=offset,
            mask=mask,
        )

    deform_conv.__name__ = deform_conv.__qualname__ = op
    deform_conv.__doc__ = _DEFORM_DOC.format(
        ndim=ndim,
        spatial={1: "L", 2: "H, W", 3: "D, H, W"}[ndim],
        dims_note="" if ndim == 2 else f", in {ndim} spatial dim{'s' * (ndim > 1)}",
        axes_note={1: "", 2: " (``(dy, dx)``, torchvision's layout)", 3: " (``(dz, dy, dx)``)"}[ndim],
    )
    return deform_conv


deform_conv1d = _deform_conv(1, "deform_conv1d")
deform_conv2d = _deform_conv(2, "deform_conv2d")
deform_conv3d = _deform_conv(3, "deform_conv3d")
_DEFORM_CONV = {1: deform_conv1d, 2: deform_conv2d, 3: deform_conv3d}


class _DeformConvNd(nn.Module):
    """torchvision's ``DeformConv2d``, in ``_ndim`` spatial dims (see :class:`DeformConv2d`)."""

    _ndim: int = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        budget: Budget = "auto",
        chunk_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d = self._ndim
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"Invalid value for `groups`; expected an int >= 1, got groups={groups!r}.")
        if in_channels % groups:
            raise ValueError(f"in_channels must be divisible by groups; got in_channels={in_channels}, {groups=}.")
        if out_channels % groups:
            raise ValueError(f"out_channels must be divisible by groups; got out_channels={out_channels}, {groups=}.")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = check_ntuple(kernel_size, d, "kernel_size")
        self.stride = check_ntuple(stride, d, "stride")
        self.padding = check_ntuple(padding, d, "padding", minimum=0)
        self.dilation = check_ntuple(dilation, d, "dilation")
        CallOptions(budget=budget, chunk_size=chunk_size)  # checked now
        self.budget, self.chunk_size = budget, chunk_size
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as torchvision: Kaiming-uniform weight (``a = sqrt(5)``), bias uniform in ``1 / sqrt(fan_in)``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        """The deformable convolution of ``input`` at ``offset`` (``mask``: DCNv2's modulation)."""
        return _DEFORM_CONV[self._ndim](
            input,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
            budget=self.budget,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        d = self._ndim
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"]
        for name, default in (("stride", (1,) * d), ("padding", (0,) * d), ("dilation", (1,) * d)):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.bias is None:
            parts.append("bias=False")
        if self.budget != "auto":
            parts.append(f"budget={self.budget!r}")
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        return ", ".join(parts)


_MODULE_DOC = """Torchvision's ``DeformConv2d``{dims_note} on chunkconv's engine: ``forward(input, offset, mask=None)``.

    Parameters ``weight`` ``(out_channels, in_channels // groups, *kernel_size)`` and ``bias``
    ``(out_channels,)`` (or None), initialised as torchvision's, so a torchvision
    ``DeformConv2d``'s ``state_dict`` loads into :class:`DeformConv2d` (and computes the same).

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: an int or one per spatial dim.
        stride: an int or one per spatial dim. Default: ``1``.
        padding: an int or one per spatial dim (zeros). Default: ``0``.
        dilation: an int or one per spatial dim. Default: ``1``.
        groups: as for torchvision's ``DeformConv2d``. Default: ``1``.
        bias: whether to learn a bias. Default: ``True``.
        budget: memory budget of each call. Default: ``"auto"``.
        chunk_size: output locations per chunk, overriding the budget. Default: ``None``.
        device: where to create the parameters. Default: ``None``.
        dtype: the parameters' dtype. Default: ``None``.

    Shape:
        ``input`` ``(N, C_in, {spatial})``, ``offset`` ``(N, G * K * {ndim}, *out)``, ``mask``
        ``(N, G * K, *out)``; output ``(N, C_out, *out)`` (see :func:`deform_conv{ndim}d`).

    Examples:
        >>> import torch
        >>> from chunkconv.ops import DeformConv2d
        >>> conv = DeformConv2d(4, 8, 3, padding=1)
        >>> x = torch.randn(1, 4, 16, 16)
        >>> conv(x, torch.zeros(1, 2 * 9, 16, 16)).shape
        torch.Size([1, 8, 16, 16])
"""


class DeformConv1d(_DeformConvNd):
    """Torchvision's ``DeformConv2d`` in 1 spatial dim (full docstring: ``_MODULE_DOC``, below)."""

    _ndim = 1


class DeformConv2d(_DeformConvNd):
    """Torchvision's ``DeformConv2d`` in 2 spatial dims (full docstring: ``_MODULE_DOC``, below)."""

    _ndim = 2


class DeformConv3d(_DeformConvNd):
    """Torchvision's ``DeformConv2d`` in 3 spatial dims (full docstring: ``_MODULE_DOC``, below)."""

    _ndim = 3


for _cls, _n in ((DeformConv1d, 1), (DeformConv2d, 2), (DeformConv3d, 3)):
    _cls.__doc__ = _MODULE_DOC.format(
        ndim=_n,
        spatial={1: "L", 2: "H, W", 3: "D, H, W"}[_n],
        dims_note="" if _n == 2 else f" in {_n} spatial dim{'s' * (_n > 1)}",
    )


def _dcn_call(
    op: str,
    input: Tensor,
    convert: Callable[[tuple[int, ...]], tuple[Tensor, Tensor]],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    group_channels: int,
    remove_center: bool,
    budget: Budget,
    chunk_size: int | None,
) -> Tensor:
    """DCNv3/v4's core: the shared form (kernels of one per group), the mask in the sampled patches, strict rule."""
    if not isinstance(input, Tensor) or input.dim() != 4:
        got = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"{op} expects a channels-last input (N, H, W, group * group_channels), got {got}.")
    n, h, w, c = input.shape
    if c != group * group_channels:
        raise ValueError(
            f"Invalid shape for `input` of {op}; expected {group * group_channels} channels "
            f"(group={group} x group_channels={group_channels}), got input of shape {tuple(input.shape)}."
        )
    if remove_center and (kernel[0] % 2 == 0 or kernel[1] % 2 == 0):
        raise ValueError(f"remove_center needs an odd kernel; got kernel_h={kernel[0]}, kernel_w={kernel[1]}.")
    out = tuple(output_size(s, k, t, 2 * p, d) for s, k, t, p, d in zip((h, w), kernel, stride, pad, dilation))
    offsets, mask = convert(out)
    spec = conv_spec(
        2, in_channels=c, out_channels=c, kernel_size=kernel, stride=stride, padding=pad, dilation=dilation
    )
    options = CallOptions(
        budget=budget,
        chunk_size=chunk_size,
        kernel="shared",
        kernel_groups=group,
        offset_groups=group,
        sampling_rule="strict",
    )
    y = apply_spec(
        input.permute(0, 3, 1, 2),
        _ones(group * kernel[0] * kernel[1]),
        spec,
        None,
        options,
        op=op,
        offsets=offsets.reshape(n, math.prod(offsets.shape[1:-2]), *out),  # no -1: an empty batch reshapes too
        mask=mask.reshape(n, math.prod(mask.shape[1:-2]), *out),
    )
    return y.permute(0, 2, 3, 1).contiguous()


def _dcn_shape(op: str, name: str, t: Tensor, expected: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"Invalid type for `{name}` of {op}; expected a Tensor, got {type(t).__name__}.")
    if tuple(t.shape) != expected:
        raise ValueError(f"Invalid shape for `{name}` of {op}; expected {expected}, got {tuple(t.shape)}.")


def dcnv3_core(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool = False,
    *,
    budget: Budget = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """InternImage's DCNv3 core op (``DCNv3Function``'s forward and backward), chunked, CPU and CUDA.

    ``out[n, ho, wo, g * D + c] = sum_t mask[..., g * K' + t] * sample(input[n, :, :, g * D + c],
    y_t, x_t)`` over the ``K' = kernel_h * kernel_w`` taps (``K' - 1`` with ``remove_center``),
    taps x-major, at ``x_t = wo * stride_w - pad_w + a_w + ((i * dilation_w - a_w) + off_x) *
    offset_scale``, ``a_w = dilation_w * (kernel_w - 1) // 2`` (``y_t`` likewise), bilinear,
    zero outside, with the strict border rule for the offsets' gradient (as its CUDA kernel). No
    weight and no softmax (the module applies it to the mask before the core). Any channel count.

    Args:
        input: channels-last ``(N, H, W, group * group_channels)``.
        offset: ``(N, Ho, Wo, group * K' * 2)``, ``(x, y)`` per tap.
        mask: ``(N, Ho, Wo, group * K')``.
        kernel_h: the kernel's height.
        kernel_w: the kernel's width.
        stride_h: the vertical stride.
        stride_w: the horizontal stride.
        pad_h: the zero padding above and below.
        pad_w: the zero padding left and right.
        dilation_h: the vertical dilation.
        dilation_w: the horizontal dilation.
        group: the groups ``G``.
        group_channels: the channels per group ``D``.
        offset_scale: the scale of the offsets (and of the taps around the window's centre).
        remove_center: skip the centre tap (odd kernels). Default: ``False``.
        budget: chunkconv's memory budget of the call. Default: ``"auto"``.
        chunk_size: output locations per chunk, overriding the budget. Default: ``None``.

    Returns:
        ``(N, Ho, Wo, group * group_channels)``, contiguous.

    Raises:
        ValueError, TypeError: shapes that do not fit, before any work.

    """
    op = "dcnv3_core"
    kernel, dil = (kernel_h, kernel_w), (dilation_h, dilation_w)
    kk = kernel_h * kernel_w - int(remove_center)

    def convert(out: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        lead = (input.shape[0], *out)
        _dcn_shape(op, "offset", offset, (*lead, group * kk * 2))
        _dcn_shape(op, "mask", mask, (*lead, group * kk))
        return dcnv3_offsets(
            offset,
            mask,
            kernel_size=kernel,
            dilation=dil,
            group=group,
            offset_scale=offset_scale,
            remove_center=remove_center,
        )

    return _dcn_call(
        op,
        input,
        convert,
        kernel,
        (stride_h, stride_w),
        (pad_h, pad_w),
        dil,
        group,
        group_channels,
        remove_center,
        budget,
        chunk_size,
    )


def dcnv4_core(
    input: Tensor,
    offset_mask: Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool = False,
    *,
    budget: Budget = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """DCNv4's core op (``DCNv4Function``, without its optional softmax), chunked, any kernel and channel count.

    :func:`dcnv3_core` with DCNv4's packing: per group ``g``,
    ``offset_mask[..., g * 3K' : g * 3K' + 2K']`` are the ``(x, y)`` offsets of the ``K'`` taps
    and the next ``K'`` entries their mask; the last dimension is ``G * 3K'`` padded to a multiple
    of 8, the padding ignored. Strict border rule. DCNv4 itself takes only 3x3 kernels and channel
    counts its kernels were built for; this takes any.

    Args:
        input: channels-last ``(N, H, W, group * group_channels)``.
        offset_mask: ``(N, Ho, Wo, ceil(group * 3K' / 8) * 8)``.
        kernel_h: as for :func:`dcnv3_core`.
        kernel_w: as for :func:`dcnv3_core`.
        stride_h: as for :func:`dcnv3_core`.
        stride_w: as for :func:`dcnv3_core`.
        pad_h: as for :func:`dcnv3_core`.
        pad_w: as for :func:`dcnv3_core`.
        dilation_h: as for :func:`dcnv3_core`.
        dilation_w: as for :func:`dcnv3_core`.
        group: as for :func:`dcnv3_core`.
        group_channels: as for :func:`dcnv3_core`.
        offset_scale: as for :func:`dcnv3_core`.
        remove_center: as for :func:`dcnv3_core`. Default: ``False``.
        budget: chunkconv's memory budget of the call. Default: ``"auto"``.
        chunk_size: output locations per chunk, overriding the budget. Default: ``None``.

    Returns:
        ``(N, Ho, Wo, group * group_channels)``, contiguous.

    Raises:
        ValueError, TypeError: shapes that do not fit, before any work.

    """
    op = "dcnv4_core"
    kernel, dil = (kernel_h, kernel_w), (dilation_h, dilation_w)
    kk = kernel_h * kernel_w - int(remove_center)

    def convert(out: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        _dcn_shape(op, "offset_mask", offset_mask, (input.shape[0], *out, -(-group * kk * 3 // 8) * 8))
        return dcnv4_offsets(
            offset_mask,
            kernel_size=kernel,
            dilation=dil,
            group=group,
            offset_scale=offset_scale,
            remove_center=remove_center,
        )

    return _dcn_call(
        op,
        input,
        convert,
        kernel,
        (stride_h, stride_w),
        (pad_h, pad_w),
        dil,
        group,
        group_channels,
        remove_center,
        budget,
        chunk_size,
    )
