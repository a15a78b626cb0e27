"""One description of a call: its options, and everything checked about it before any work.

:class:`CallOptions` is what a user chooses besides the convolution itself (budget, chunk size,
path, ...); it is checked once, when made, and travels as one frozen object from the public
functions and modules to the planner. :func:`describe_call` checks an input's shape, dtype and
device, the bias and the generator against a :class:`~chunkconv.geometry.ConvSpec` exactly once
and returns a :class:`Call`; nothing after it re-checks. The name of the public function that was
called (``op``) lives on the :class:`Call`, so messages name it without threading it around.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from .checks import (
    AUTOCAST_DTYPES,
    SideInput,
    batched_shape,
    check_bias,
    check_bool,
    check_budget_form,
    check_chunk_size,
    check_device,
    check_generator,
    check_input_dtype,
    check_inputs,
    check_path,
    check_sampling,
    check_side_inputs,
    check_static_weight,
    input_kinds,
)
from .deform_reference import check_rule
from .forms import FORMS, KernelForm, check_form, make_form
from .geometry import ConvGeometry, ConvSpec
from .streams import SampledPatches, StreamSpec, describe_streams

__all__ = ["Budget", "Call", "CallOptions", "Generator", "describe_call", "result_dtype"]

Generator = Callable[[Tensor], Tensor] | nn.Module
Budget = str | int | float | None


@dataclass(frozen=True, kw_only=True)
class CallOptions:
    """How to run a call, apart from the convolution's arguments; checked when made (by keyword only).

    A :class:`~chunkconv.DynamicConv` holds one (``conv.options``); its ``budget``, ``chunk_size``,
    ``allow_batch_coupled``, ``path`` and ``progress`` properties replace it with
    ``dataclasses.replace``, which checks the new values.

    Attributes:
        budget: the memory budget, as the user wrote it (parsed per call: fractions and
            ``"auto"`` depend on the memory free at that moment).
        chunk_size: patches per chunk, overriding the budget; ``None`` to plan from the budget.
        allow_batch_coupled: run generators whose rows interact.
        path: ``"auto"``, ``"fast"`` or ``"generic"``.
        kernel: the kernel form, ``"full"``, ``"modulated"`` or ``"shared"`` (see :mod:`chunkconv.forms`).
        kernel_groups: the channel groups of ``kernel="shared"`` (default 1).
        inputs: what the generator receives, in order: ``"patches"``, ``"features"``, ``"guide"``,
            ``"positions"``.
        progress: show progress over the chunks (``None``: the process-wide setting, see
            :func:`chunkconv.set_progress`).
        offset_groups: the offset groups of a deformable call (``offsets=`` then required at
            every call); ``None``: no offsets (a function infers them from ``offsets=``).
        sampling_rule: the offsets' gradient rule, ``"torchvision"`` or ``"strict"`` (DCNv3/DCNv4;
            see :mod:`chunkconv.deform_reference`).

    """

    budget: Budget = "auto"
    chunk_size: int | None = None
    allow_batch_coupled: bool = False
    path: str = "auto"
    kernel: str = "full"
    kernel_groups: int | None = None
    inputs: tuple[str, ...] = ("patches",)
    progress: bool | None = None
    offset_groups: int | None = None
    sampling_rule: str = "torchvision"

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> CallOptions:
        """The options among a public entry point's arguments (its ``locals()``), taken by field name.

        ``dynamic_conv*``, ``plan`` and ``DynamicConv`` write the options out in their signatures
        (for help and completion) and build them here, so a new option is one field plus one
        keyword per signature; ``tests/test_signatures.py`` checks that the names and defaults
        agree. ``inputs`` may be a bare kind, as torch takes an int for a tuple.
        """
        found = {f.name: arguments[f.name] for f in fields(cls) if f.name in arguments}
        if "inputs" in found:
            found["inputs"] = input_kinds(found["inputs"])
        return cls(**found)

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)
        og = self.offset_groups
        if og is not None and (isinstance(og, bool) or not isinstance(og, int) or og < 1):
            raise ValueError(
                f"Invalid value for `offset_groups`; expected an int >= 1 or None, got offset_groups={og!r}."
            )
        check_rule(self.sampling_rule)
        check_path(self.path)
        check_budget_form(self.budget)
        object.__setattr__(self, "inputs", check_inputs(self.inputs))
        check_bool("progress", self.progress, optional=True)  # 1 and "no" are not bools
        check_bool("allow_batch_coupled", self.allow_batch_coupled)
        if self.kernel not in FORMS:
            raise ValueError(f"Invalid value for `kernel`; expected one of {FORMS}, got kernel={self.kernel!r}.")


def result_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The output dtype torch's conv would give for an input under the current autocast state."""
    if torch.is_autocast_enabled(device.type) and dtype in AUTOCAST_DTYPES:
        return torch.get_autocast_dtype(device.type)
    return dtype


@dataclass(frozen=True)
class Call:
    """One checked call: what it computes, on what, and what needs a gradient.

    ``params`` are the generator's parameters by name (the tensors autograd tracks); ``training``
    says whether backward will run; ``op`` names the public function or module called.
    ``streams`` describe the per-location inputs a chunk reads (the patches first, then each
    other kind the generator receives: kind, channels, whether it needs a gradient);
    ``generator_inputs`` index them in the generator's order.
    """

    op: str
    spec: ConvSpec
    geom: ConvGeometry
    unbatched: bool
    dtype: torch.dtype
    out_dtype: torch.dtype
    device: torch.device
    training: bool
    input_grad: bool
    params: dict[str, Tensor]
    options: CallOptions
    form: KernelForm
    streams: tuple[StreamSpec, ...] = ()
    generator_inputs: tuple[int, ...] = (0,)


def describe_call(
    op: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    generator: Generator,
    spec: ConvSpec,
    bias: Tensor | None,
    options: CallOptions,
    *,
    training: bool | None,
    input_grad: bool,
    side: dict[str, SideInput] | None = None,
    weight: Tensor | None = None,
    sampling: dict[str, SideInput] | None = None,
) -> Call:
    """Check a call on an input of ``shape``, ``dtype`` and ``device``: every check, no tensor work.

    ``side`` maps ``"features"``/``"guide"`` to the tensors (or shapes) given; ``weight`` is the
    modulated form's static weight; ``sampling`` maps ``"offsets"`` (and ``"mask"``) to the
    deformable call's tensors (or shapes) in torchvision's layout. ``training`` ``None`` means:
    whether grad mode is on and anything needs a gradient.
    """
    check_device(device)
    check_bool("training", training, optional=True)
    check_input_dtype(dtype, op)
    batched, unbatched = batched_shape(shape, spec.ndim, spec.in_channels, op)
    geom = spec.geometry(batched)
    check_bias(bias, device, spec.out_channels, dtype)
    kernel_groups = check_form(options.kernel, options.kernel_groups, spec.in_channels, spec.out_channels, spec.groups)
    check_static_weight(weight, options.kernel, geom.weight_shape, device, dtype)
    side = side or {}
    check_side_inputs(side, options.inputs, geom, unbatched, dtype, device, op)
    params = check_generator(generator, device, dtype, options.allow_batch_coupled)
    given = {k: (_shape(t)[1 - unbatched], _requires_grad(t)) for k, t in side.items()}
    sampled = None
    sampling = sampling or {}
    groups = check_sampling(sampling, options.offset_groups, geom, unbatched, device, op)
    if groups is not None:
        grads = (input_grad, *(_requires_grad(sampling[k]) for k in ("offsets", "mask") if k in sampling))
        sampled = SampledPatches(groups, "mask" in sampling, options.sampling_rule, (*grads, False)[:3])
    streams = describe_streams(options.inputs, spec.in_channels, input_grad, given, sampled)
    if training is None:
        tracked = (*params.values(), *(t for t in (bias, weight) if t is not None))
        wanted = any(s.requires_grad for s in streams) or any(t.requires_grad for t in tracked)
        training = torch.is_grad_enabled() and wanted
    streams = tuple(replace(s, requires_grad=s.requires_grad and training) for s in streams)
    return Call(
        op=op,
        spec=spec,
        geom=geom,
        unbatched=unbatched,
        dtype=dtype,
        out_dtype=result_dtype(device, dtype),
        device=device,
        training=training,
        input_grad=input_grad and training,
        params=params,
        options=options,
        form=make_form(options.kernel, geom, kernel_groups),
        streams=streams,
        generator_inputs=tuple(["patches", *(s.name for s in streams[1:])].index(k) for k in options.inputs),
    )


def _shape(t: SideInput) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, Tensor) else tuple(t)


def _requires_grad(t: SideInput) -> bool:
    return t.requires_grad if isinstance(t, Tensor) else True
