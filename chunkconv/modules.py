"""``DynamicConv`` and its fixed-dimension forms: the layer users wrap their generator with."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .call import Budget, CallOptions
from .checks import check_generator_callable
from .forms import FORM_CLASSES, check_form
from .functional import apply_spec, plan_spec
from .geometry import conv_spec
from .planner import Plan

__all__ = ["DynamicConv", "DynamicConv1d", "DynamicConv2d", "DynamicConv3d"]


class DynamicConv(nn.Module):
    """A convolution whose kernel at every location is generated from that location's patch.

    For every sliding-window patch, ``generator`` maps the patch (a row of
    ``in_channels * prod(kernel_size)`` features in ``F.unfold`` order) to the
    weight ``F.conv*d`` would take there, ``(out_channels, in_channels // groups,
    *kernel_size)`` (or flattened), and the output at that location is that
    weight applied to that patch. The patch dimension is processed in chunks,
    so neither the whole unfold nor all weights ever exist, and backward
    recomputes each chunk instead of storing it.

    Args:
        generator: an ``nn.Module`` (registered as a submodule, so its
            parameters train) or any callable ``(B, P) -> (B, out * in/groups * K)``.
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: an int or a tuple, as for ``nn.Conv*d``; the number of spatial dims is
            ``len(kernel_size)`` (an int means 2-D).
        stride: as for ``nn.Conv*d``. Default: ``1``.
        padding: as for ``nn.Conv*d``, including ``"same"`` and ``"valid"``. Default: ``0``.
        dilation: as for ``nn.Conv*d``. Default: ``1``.
        groups: as for ``nn.Conv*d``. Default: ``1``.
        bias: whether to add a learned bias. Default: ``True``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``, as for
            ``nn.Conv*d``. Default: ``"zeros"``.
        device: where to create the bias. Default: ``None``.
        dtype: the bias's dtype. Default: ``None``.
        budget: the memory one call may allocate (forward, and backward separately): ``"4GB"``,
            ``"512MiB"``, bytes, a fraction of free memory, or ``"auto"``. Default: ``"auto"``.
        chunk_size: patches per chunk, overriding the budget (expert use). Default: ``None``.
        allow_batch_coupled: run generators whose rows interact (BatchNorm in
            training mode, attention) although their results then depend on
            the chunking. Default: ``False``.
        path: ``"auto"`` runs the fast path (per-patch weights never formed; see
            ``docs/fast-path.md``) where the generator is an ``nn.Linear`` or an
            ``nn.Sequential`` ending in one, the generic path otherwise; ``"fast"``
            insists (``ValueError`` if the generator does not qualify); ``"generic"``
            always forms the weights. Default: ``"auto"``.
        kernel: what the generator returns per location: ``"full"`` (a weight
            ``(out, in // groups, *kernel_size)``), ``"modulated"`` (per-tap scalars
            ``(*kernel_size)`` or ``(in, *kernel_size)`` scaling the layer's static
            ``weight``, initialised as ``nn.Conv*d``'s) or ``"shared"`` (one kernel per
            channel group, ``(kernel_groups, *kernel_size)``, applied depthwise; needs
            ``out_channels == in_channels`` and ``groups=1``). Default: ``"full"``.
        kernel_groups: channel groups of ``kernel="shared"``: channel ``c`` uses the kernel
            of group ``c // (in_channels // kernel_groups)``. Default: ``None`` (1).
        inputs: what the generator receives, positionally in this order: ``"patches"``,
            ``"features"`` (rows ``(B, F)`` of ``features=`` passed to the call, shaped
            ``(N, F, *out)``), ``"guide"`` (patches ``(B, G * prod(kernel_size))`` of
            ``guide=``, shaped ``(N, G, *spatial)``, windowed like the input) and
            ``"positions"`` (rows ``(B, ndim)``: each output location's window centre in the
            input, in ``[-1, 1]`` as ``grid_sample`` with ``align_corners=False``, in tensor
            dimension order). Default: ``("patches",)``.
        progress: show progress over the chunks of each call (tqdm when installed); ``None``
            follows ``chunkconv.set_progress`` (off unless set; ``"auto"`` shows long calls).
            Default: ``None``.
        offset_groups: make it a deformable convolution: every call then takes ``offsets=``
            ``(N, offset_groups * K * d, *out)`` (and optionally ``mask=`` ``(N, offset_groups * K,
            *out)``), torchvision's layout; the patches are sampled there (see
            ``dynamic_conv``'s ``offsets``). Zero padding only. Default: ``None`` (no offsets).
        sampling_rule: the offsets' gradient rule, ``"torchvision"`` or ``"strict"``
            (DCNv3/DCNv4). Default: ``"torchvision"``.

    Shape:
        Input ``(N, C_in, *spatial)`` or ``(C_in, *spatial)``; output
        ``(N, C_out, *out)`` with ``out = floor((in + 2*padding - dilation*(k-1) - 1) / stride) + 1``,
        torch's formula.

    Examples:
        >>> import torch, chunkconv
        >>> P = 4 * 3 * 3
        >>> gen = torch.nn.Sequential(torch.nn.Linear(P, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6 * P))
        >>> conv = chunkconv.DynamicConv(gen, 4, 6, kernel_size=3, padding=1)
        >>> conv(torch.randn(2, 4, 10, 10)).shape
        torch.Size([2, 6, 10, 10])

    """

    _ndim: int | None = None

    def __init__(
        self,
        generator: nn.Module | Callable[[Tensor], Tensor],
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        budget: Budget = "auto",
        chunk_size: int | None = None,
        allow_batch_coupled: bool = False,
        path: str = "auto",
        kernel: str = "full",
        kernel_groups: int | None = None,
        inputs: Sequence[str] = ("patches",),
        progress: bool | None = None,
        offset_groups: int | None = None,
        sampling_rule: str = "torchvision",
    ) -> None:
        super().__init__()
        check_generator_callable(generator)
        self.spec = conv_spec(
            self._ndim,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
        )
        self.generator = generator
        # one options object, checked now (not at the first forward); the settings that may change
        # between calls are properties that replace it (checked again then)
        self.options = CallOptions.from_arguments(locals())
        if offset_groups is not None and padding_mode != "zeros":
            raise ValueError(
                "Deformable sampling pads with zeros only; expected padding_mode='zeros' with offset_groups, "
                f"got padding_mode={padding_mode!r}."
            )
        if offset_groups is not None and in_channels % offset_groups:
            raise ValueError(
                f"Invalid value for `offset_groups`; expected a divisor of in_channels={in_channels}, "
                f"got offset_groups={offset_groups}."
            )
        # the kernel form and what the generator receives are fixed at construction (they decide
        # which parameters the layer owns)
        s = self.spec
        check_form(kernel, kernel_groups, s.in_channels, s.out_channels, s.groups)
        if FORM_CLASSES[kernel].STATIC_WEIGHT:  # the static weight the generator's scalars modulate, as nn.Conv*d's
            shape = (s.out_channels, s.in_channels // s.groups, *s.kernel_size)
            self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # nn.Conv*d attribute names, read from the checked spec
    in_channels = property(lambda self: self.spec.in_channels)
    out_channels = property(lambda self: self.spec.out_channels)
    kernel_size = property(lambda self: self.spec.kernel_size)
    stride = property(lambda self: self.spec.stride)
    padding = property(lambda self: self.spec.padding)
    dilation = property(lambda self: self.spec.dilation)
    groups = property(lambda self: self.spec.groups)
    padding_mode = property(lambda self: self.spec.padding_mode)

    # the call options, read from the one options object; those that may change between calls
    # replace it (``conv.budget = "1GB"``), checked when set
    budget = property(lambda self: self.options.budget, lambda self, v: self._replace(budget=v))
    chunk_size = property(lambda self: self.options.chunk_size, lambda self, v: self._replace(chunk_size=v))
    allow_batch_coupled = property(
        lambda self: self.options.allow_batch_coupled, lambda self, v: self._replace(allow_batch_coupled=v)
    )
    path = property(lambda self: self.options.path, lambda self, v: self._replace(path=v))
    progress = property(lambda self: self.options.progress, lambda self, v: self._replace(progress=v))
    # fixed at construction: they decide which parameters the layer owns
    kernel = property(lambda self: self.options.kernel)
    kernel_groups = property(lambda self: self.options.kernel_groups)
    inputs = property(lambda self: self.options.inputs)
    offset_groups = property(lambda self: self.options.offset_groups)
    sampling_rule = property(lambda self: self.options.sampling_rule)

    def _replace(self, **changes: Any) -> None:
        self.options = dataclasses.replace(self.options, **changes)

    _OLD_OPTIONS = ("budget", "chunk_size", "allow_batch_coupled", "path", "kernel", "kernel_groups", "inputs")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Load a layer pickled by chunkconv 0.1, which kept each option as an attribute of its own."""
        if "options" not in state and "budget" in state:
            old = {name: state.pop(name) for name in (*self._OLD_OPTIONS, "progress") if name in state}
            state.pop("_checked_options", None)
            state["options"] = CallOptions(**old)
        super().__setstate__(state)

    def reset_parameters(self) -> None:
        """Initialise the static weight and the bias as ``nn.Conv*d`` does; the generator keeps its own."""
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.spec.in_channels // self.spec.groups * math.prod(self.spec.kernel_size)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        input: Tensor,
        *,
        features: Tensor | None = None,
        guide: Tensor | None = None,
        offsets: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """The convolution of ``input``; ``features`` and ``guide`` are the side inputs ``inputs`` names,
        ``offsets`` and ``mask`` a deformable layer's (see ``offset_groups``).
        """
        if offsets is not None and self.offset_groups is None:
            raise ValueError(
                f"{type(self).__name__} got `offsets=` but was built without offset_groups; build it with "
                "offset_groups=G to make it a deformable convolution."
            )
        return apply_spec(
            input,
            self.generator,
            self.spec,
            self.bias,
            self.options,
            op=type(self).__name__,
            features=features,
            guide=guide,
            weight=self.weight,
            offsets=offsets,
            mask=mask,
        )

    def plan(
        self,
        input: Tensor | Sequence[int],
        *,
        features: Tensor | Sequence[int] | None = None,
        guide: Tensor | Sequence[int] | None = None,
        training: bool | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        offsets: Tensor | Sequence[int] | None = None,
        mask: Tensor | Sequence[int] | None = None,
    ) -> Plan:
        """What ``self(input)`` would do and cost, without running it; ``input`` may be a shape.

        Args:
            features: the side input of that name (a tensor or its shape), if ``inputs`` names it.
            guide: the side input of that name (a tensor or its shape), if ``inputs`` names it.
            training: plan forward and backward (default: grad mode is on and something needs
                a gradient; for a shape the input is assumed to need one).
            dtype: the input's dtype when ``input`` is a shape (default: the generator's parameters').
            device: the input's device when ``input`` is a shape (default: the generator's parameters').
            offsets: a deformable layer's offsets (a tensor or its shape).
            mask: a deformable layer's mask (a tensor or its shape), if the calls take one.

        Examples:
            >>> import torch, chunkconv
            >>> gen = torch.nn.Sequential(torch.nn.Linear(36, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4 * 36))
            >>> conv = chunkconv.DynamicConv(gen, 4, 4, 3, padding=1, budget="64MB")
            >>> conv.plan((2, 4, 64, 64)).num_chunks >= 1
            True

        """
        return plan_spec(
            input,
            self.generator,
            self.spec,
            self.bias,
            self.options,
            training=training,
            dtype=dtype,
            device=device,
            op=f"{type(self).__name__}.plan",
            features=features,
            guide=guide,
            weight=self.weight,
            offsets=offsets,
            mask=mask,
        )

    def extra_repr(self) -> str:
        """The non-default arguments, as ``nn.Conv*d`` shows them."""
        s = self.spec
        parts = [f"{s.in_channels}, {s.out_channels}, kernel_size={s.kernel_size}"]
        ones = (1,) * s.ndim
        if s.stride != ones:
            parts.append(f"stride={s.stride}")
        if s.padding not in ("valid", (0,) * s.ndim):
            parts.append(f"padding={s.padding!r}")
        if s.dilation != ones:
            parts.append(f"dilation={s.dilation}")
        if s.groups != 1:
            parts.append(f"groups={s.groups}")
        if self.bias is None:
            parts.append("bias=False")
        if s.padding_mode != "zeros":
            parts.append(f"padding_mode={s.padding_mode!r}")
        if self.budget != "auto":
            parts.append(f"budget={self.budget!r}")
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        if self.allow_batch_coupled:
            parts.append("allow_batch_coupled=True")
        if self.path != "auto":
            parts.append(f"path={self.path!r}")
        if self.kernel != "full":
            parts.append(f"kernel={self.kernel!r}")
        if self.kernel_groups is not None:
            parts.append(f"kernel_groups={self.kernel_groups}")
        if self.inputs != ("patches",):
            parts.append(f"inputs={self.inputs!r}")
        if self.offset_groups is not None:
            parts.append(f"offset_groups={self.offset_groups}")
        if self.sampling_rule != "torchvision":
            parts.append(f"sampling_rule={self.sampling_rule!r}")
        if not isinstance(self.generator, nn.Module):  # a module generator prints as a child instead
            parts.append(f"generator={getattr(self.generator, '__qualname__', None) or type(self.generator).__name__}")
        return ", ".join(parts)


class DynamicConv1d(DynamicConv):
    """``DynamicConv`` over one spatial dimension (input ``(N, C, L)``)."""

    _ndim = 1


class DynamicConv2d(DynamicConv):
    """``DynamicConv`` over two spatial dimensions (input ``(N, C, H, W)``)."""

    _ndim = 2


class DynamicConv3d(DynamicConv):
    """``DynamicConv`` over three spatial dimensions (input ``(N, C, D, H, W)``)."""

    _ndim = 3
