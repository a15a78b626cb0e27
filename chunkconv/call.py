"""One description of a call: its options, and everything checked about it before any work.

:class:`CallOptions` is what a user chooses besides the convolution itself (budget, chunk size,
path, ...); it is checked once, when made, and travels as one frozen object from the public
functions and modules to the planner. :func:`describe_call` checks an input's shape, dtype and
device, the bias and the generator against a :class:`~chunkconv.geometry.ConvSpec` exactly once
and returns a :class:`Call`; nothing after it re-checks. The name of the public function that was
called (``op``) lives on the :class:`Call`, so messages name it without threading it around.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .checks import (
    AUTOCAST_DTYPES,
    batched_shape,
    check_bias,
    check_budget_form,
    check_chunk_size,
    check_generator,
    check_input_dtype,
    check_path,
)
from .geometry import ConvGeometry, ConvSpec

__all__ = ["Budget", "Call", "CallOptions", "Generator", "describe_call", "result_dtype"]

Generator = Callable[[Tensor], Tensor] | nn.Module
Budget = str | int | float | None


@dataclass(frozen=True)
class CallOptions:
    """How to run a call, apart from the convolution's arguments; checked when made.

    Attributes:
        budget: the memory budget, as the user wrote it (parsed per call: fractions and
            ``"auto"`` depend on the memory free at that moment).
        chunk_size: patches per chunk, overriding the budget; ``None`` to plan from the budget.
        allow_batch_coupled: run generators whose rows interact.
        path: ``"auto"``, ``"fast"`` or ``"generic"``.

    """

    budget: Budget = "auto"
    chunk_size: int | None = None
    allow_batch_coupled: bool = False
    path: str = "auto"

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)
        check_path(self.path)
        check_budget_form(self.budget)


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
) -> Call:
    """Check a call on an input of ``shape``, ``dtype`` and ``device``: every check, no tensor work.

    ``training`` ``None`` means: whether grad mode is on and anything needs a gradient.
    """
    check_input_dtype(dtype, op)
    batched, unbatched = batched_shape(shape, spec.ndim, spec.in_channels, op)
    geom = spec.geometry(batched)
    check_bias(bias, device, spec.out_channels)
    params = check_generator(generator, device, dtype, options.allow_batch_coupled)
    if training is None:
        tracked = (*params.values(), *([bias] if bias is not None else []))
        training = torch.is_grad_enabled() and (input_grad or any(t.requires_grad for t in tracked))
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
    )
