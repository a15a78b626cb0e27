"""The functional API: validate everything, plan, then run.

``dynamic_conv1d/2d/3d`` (and ``dynamic_conv``, which takes the number of
spatial dims from ``kernel_size``) check every argument and the generator
before any tensor work, ask the planner for a chunking, and run it through the
autograd Function when a gradient is needed or straight through the executor
when not (no saved tensors under ``torch.no_grad``/``inference_mode``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._compile import opaque_to_compile
from .autograd import DynamicConvFunction, ForwardContext
from .errors import BatchCoupledGeneratorError
from .execute import ChunkStep, GeneratorStep, forward_chunks
from .fast_execute import LinearTailStep
from .fastpath import choose_path
from .geometry import ConvGeometry, ConvSpec, conv_spec_for_input
from .planner import Plan, make_plan

__all__ = [
    "apply_spec",
    "dynamic_conv",
    "dynamic_conv1d",
    "dynamic_conv2d",
    "dynamic_conv3d",
    "plan",
    "plan_spec",
]

Generator = Callable[[Tensor], Tensor]
Budget = str | int | float | None

# Modules whose output for one row depends on the other rows of the same call
# when given a 2-D (B, features) tensor: chunking would change their results.
_ATTENTION_TYPES = (
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


# The dtypes autocast casts to its lower precision (it leaves float64 alone).
_AUTOCAST_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


def _batch_coupled_reason(generator: Generator) -> str | None:
    if not isinstance(generator, nn.Module):
        return None
    for name, module in generator.named_modules():
        where = f" (at {name!r})" if name else ""
        kind = type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training:
                return f"{kind}{where} is in training mode, so it normalises with the statistics of the chunk"
            if module.running_mean is None:
                return f"{kind}{where} has track_running_stats=False, so it always uses the chunk's statistics"
        if isinstance(module, _ATTENTION_TYPES):
            return f"{kind}{where} attends across the rows of its 2-D input, i.e. across the patches of the chunk"
    return None


def _sharded_reason(generator: Generator) -> str | None:
    """Say where the generator is wrapped by FSDP, whose forward would fight the recomputation."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # loaded by anyone who can have wrapped it
    if fsdp is None or not isinstance(generator, nn.Module):
        return None
    kinds = tuple(getattr(fsdp, name) for name in ("FSDPModule", "FullyShardedDataParallel") if hasattr(fsdp, name))
    for name, module in generator.named_modules():
        if isinstance(module, kinds):
            where = f"the generator's submodule {name!r}" if name else "the generator"
            return f"{where} is sharded by {type(module).__name__}"
    return None


def _check_generator(
    generator: Generator, device: torch.device, dtype: torch.dtype, allow_batch_coupled: bool
) -> dict[str, Tensor]:
    """Refuse generators that cannot work on the input; return the parameters autograd must track."""
    if not callable(generator):
        raise TypeError(
            f"Invalid type for `generator`; expected an nn.Module or a callable, got {type(generator).__name__}."
        )
    if not allow_batch_coupled:
        reason = _batch_coupled_reason(generator)
        if reason is not None:
            raise BatchCoupledGeneratorError(
                f"The generator mixes patches of one call: {reason}. Its output for one patch would "
                "depend on which other patches share its chunk, so results would change with the "
                "chunk size. Put the generator in eval mode (generator.eval()), use a per-patch "
                "normalisation (LayerNorm, GroupNorm), or pass allow_batch_coupled=True to accept "
                "chunk-dependent results."
            )
    sharded = _sharded_reason(generator)
    if sharded is not None:
        raise ValueError(
            f"Invalid `generator`: {sharded}. FSDP gathers and frees the parameters of a module "
            "around each of its forward calls, but chunkconv calls the generator once per chunk and "
            "again per chunk in backward with its parameters swapped for stand-ins, so its gradients "
            "would be lost. Shard the DynamicConv layer (or a module containing it) instead: "
            "fully_shard(conv), not fully_shard(conv.generator)."
        )
    if not isinstance(generator, nn.Module):
        return {}
    autocast = torch.is_autocast_enabled(device.type)
    for name, tensor in [*generator.named_parameters(), *generator.named_buffers()]:
        if tensor.device != device:
            raise ValueError(
                f"The generator's {name!r} is on {tensor.device} but the input is on {device}; "
                "expected both on the same device (move the generator with .to(device))."
            )
        cast_by_autocast = autocast and {tensor.dtype, dtype} <= _AUTOCAST_DTYPES
        if tensor.is_floating_point() and tensor.dtype != dtype and not cast_by_autocast:
            raise ValueError(
                f"The generator's {name!r} has dtype {tensor.dtype} but the input has dtype {dtype}; "
                "expected the same dtype (convert one with .to(dtype), or run under torch.autocast, "
                "which casts float32/float16/bfloat16 but not float64)."
            )
    return dict(generator.named_parameters())


def _result_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The output dtype torch's conv would give for an input under the current autocast state."""
    if torch.is_autocast_enabled(device.type) and dtype in _AUTOCAST_DTYPES:
        return torch.get_autocast_dtype(device.type)
    return dtype


def _check_bias(bias: Tensor | None, device: torch.device, out_channels: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"Invalid type for `bias`; expected a Tensor or None, got {type(bias).__name__}.")
    if tuple(bias.shape) != (out_channels,):
        raise ValueError(
            f"Invalid shape for `bias`; expected ({out_channels},) for out_channels={out_channels}, "
            f"got {tuple(bias.shape)}."
        )
    if bias.device != device:
        raise ValueError(f"`bias` is on {bias.device} but the input is on {device}; expected the same device.")


def _batched_shape(shape: Sequence[int], ndim: int, in_channels: int, op: str) -> tuple[tuple[int, ...], bool]:
    """The ``(N, C, *spatial)`` shape of an input and whether it was unbatched."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (ndim + 1, ndim + 2):
        raise ValueError(
            f"Expected {ndim + 1}-D (unbatched) or {ndim + 2}-D (batched) input to {op}, "
            f"got input of shape {shape}."
        )
    unbatched = len(shape) == ndim + 1
    channels = shape[0 if unbatched else 1]
    if channels != in_channels:
        raise ValueError(
            f"Expected input with {in_channels} channels (in_channels={in_channels}), "
            f"got {channels} channels in input of shape {shape}."
        )
    return ((1, *shape) if unbatched else shape), unbatched


@dataclass(frozen=True)
class _Call:
    """One checked call: its geometry, what needs a gradient, and its plan."""

    geom: ConvGeometry
    unbatched: bool
    params: dict[str, Tensor]
    out_dtype: torch.dtype
    step: ChunkStep
    plan: Plan


def _check_call(
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    generator: Generator,
    spec: ConvSpec,
    bias: Tensor | None,
    *,
    budget: Budget,
    chunk_size: int | None,
    allow_batch_coupled: bool,
    path: str,
    training: bool | None,
    input_grad: bool,
    estimate: bool,
    op: str,
) -> _Call:
    """Every check and the plan, from the input's shape, dtype and device: no tensor work."""
    if not dtype.is_floating_point:
        raise TypeError(f"Expected a floating-point input to {op}, got dtype {dtype}.")
    batched, unbatched = _batched_shape(shape, spec.ndim, spec.in_channels, op)
    geom = spec.geometry(batched)
    _check_bias(bias, device, spec.out_channels)
    params = _check_generator(generator, device, dtype, allow_batch_coupled)
    if training is None:
        training = torch.is_grad_enabled() and (
            input_grad or any(t.requires_grad for t in (*params.values(), *([bias] if bias is not None else [])))
        )
    out_dtype = _result_dtype(device, dtype)
    choice = choose_path(generator, geom, out_dtype, path, device=device)
    step: ChunkStep
    if choice.path == "fast":
        step = LinearTailStep(generator, tuple(params), choice, geom)  # type: ignore[arg-type]
    else:
        step = GeneratorStep(generator, tuple(params), geom)
    plan = make_plan(
        geom,
        generator=generator,
        step=step,
        path=choice,
        dtype=dtype,
        out_dtype=out_dtype,
        device=device,
        budget=budget,
        chunk_size=chunk_size,
        training=training,
        input_grad=input_grad and training,
        estimate=estimate,
    )
    return _Call(geom, unbatched, params, out_dtype, step, plan)


@opaque_to_compile
def apply_spec(
    input: Tensor,
    generator: Generator,
    spec: ConvSpec,
    bias: Tensor | None = None,
    *,
    budget: Budget = "auto",
    chunk_size: int | None = None,
    allow_batch_coupled: bool = False,
    path: str = "auto",
    op: str = "dynamic_conv",
) -> Tensor:
    """Run a checked :class:`ConvSpec` (the shared body of the functions and the modules)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"Invalid type for `input` of {op}; expected a Tensor, got {type(input).__name__}.")
    call = _check_call(
        input.shape,
        input.dtype,
        input.device,
        generator,
        spec,
        bias,
        budget=budget,
        chunk_size=chunk_size,
        allow_batch_coupled=allow_batch_coupled,
        path=path,
        training=None,
        input_grad=input.requires_grad,
        estimate=False,
        op=op,
    )
    x = input.unsqueeze(0) if call.unbatched else input
    geom, chunk = call.geom, call.plan.chunk_size
    if call.plan.training:
        run = ForwardContext(call.step, geom, chunk, call.out_dtype)
        y = DynamicConvFunction.apply(x, bias, run, *call.params.values())
    else:
        with torch.no_grad():  # nothing to differentiate: record no graph, whatever the generator captures
            y, _ = forward_chunks(x, call.step.bind(None), geom, chunk, call.out_dtype)
        if bias is not None:
            y += bias.view(1, -1, *([1] * geom.ndim)).to(y.dtype)
    return y.squeeze(0) if call.unbatched else y


def plan_spec(
    input: Tensor | Sequence[int],
    generator: Generator,
    spec: ConvSpec,
    bias: Tensor | None = None,
    *,
    budget: Budget = "auto",
    chunk_size: int | None = None,
    allow_batch_coupled: bool = False,
    path: str = "auto",
    training: bool | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    op: str = "plan",
) -> Plan:
    """The :class:`Plan` a call on ``input`` (a tensor, or just its shape) would run."""
    if isinstance(input, Tensor):
        shape, dtype, dev, input_grad = input.shape, input.dtype, input.device, input.requires_grad
    else:
        reference = next(iter(generator.parameters()), None) if isinstance(generator, nn.Module) else None
        dtype = dtype or (reference.dtype if reference is not None else torch.get_default_dtype())
        fallback = reference.device if reference is not None else torch.device("cpu")
        dev = torch.device(device) if device is not None else fallback
        shape, input_grad = tuple(input), True
    call = _check_call(
        shape,
        dtype,
        dev,
        generator,
        spec,
        bias,
        budget=budget,
        chunk_size=chunk_size,
        allow_batch_coupled=allow_batch_coupled,
        path=path,
        training=training,
        input_grad=input_grad,
        estimate=True,
        op=op,
    )
    return call.plan


_FUNCTIONAL_DOC = """Dynamic {what}: every output location uses the weight ``generator`` makes from its patch.

    Args:
        input: ``(N, C_in, {dims})`` or unbatched ``(C_in, {dims})``.
        generator: ``nn.Module`` or callable mapping patches ``(B, C_in * prod(kernel_size))``
            (rows in ``F.unfold`` order) to weights ``(B, out_channels, C_in // groups,
            *kernel_size)`` or the same flattened.
        out_channels: channels of the output.
        kernel_size: an int or a tuple, as for ``F.conv{n}``.{ndim_note}
        stride: as for ``F.conv{n}``. Default: ``1``.
        padding: as for ``F.conv{n}``, including ``"same"`` and ``"valid"``. Default: ``0``.
        dilation: as for ``F.conv{n}``. Default: ``1``.
        groups: as for ``F.conv{n}``. Default: ``1``.
        bias: optional ``(out_channels,)`` tensor. Default: ``None``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``, as for
            ``nn.Conv{n}``. Default: ``"zeros"``.
        budget: memory budget of the call: ``"4GB"``, ``"512MiB"``, bytes, a fraction of free
            memory, or ``"auto"``. Default: ``"auto"``.
        chunk_size: patches per chunk, overriding the budget. Default: ``None``.
        allow_batch_coupled: accept generators whose rows interact (chunk-dependent results).
            Default: ``False``.
        path: ``"auto"`` (the fast path where the generator ends in ``nn.Linear``, see
            ``docs/fast-path.md``), ``"fast"`` (raise if it does not qualify) or ``"generic"``.
            Default: ``"auto"``.

    Returns:
        ``(N, out_channels, *out)`` (unbatched in, unbatched out), with torch's output size
        ``out = floor((in + pad_left + pad_right - dilation * (k - 1) - 1) / stride) + 1``.

    Raises:
        ValueError, TypeError: bad arguments or input, before any work.
        BudgetTooSmallError: not even one patch per chunk fits ``budget``.
        GeneratorOutputError: the generator's output is not one weight per patch.
        BatchCoupledGeneratorError: the generator mixes patches (e.g. BatchNorm in training mode).
"""


def _functional(ndim: int | None, op: str):
    def conv(
        input: Tensor,
        generator: Generator,
        out_channels: int,
        kernel_size: int | Sequence[int],
        bias: Tensor | None = None,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        *,
        padding_mode: str = "zeros",
        budget: Budget = "auto",
        chunk_size: int | None = None,
        allow_batch_coupled: bool = False,
        path: str = "auto",
    ) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"Invalid type for `input` of {op}; expected a Tensor, got {type(input).__name__}.")
        spec = conv_spec_for_input(
            input.shape, ndim, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, op
        )
        return apply_spec(
            input,
            generator,
            spec,
            bias,
            budget=budget,
            chunk_size=chunk_size,
            allow_batch_coupled=allow_batch_coupled,
            path=path,
            op=op,
        )

    conv.__name__ = conv.__qualname__ = op
    dims = {1: "L", 2: "H, W", 3: "D, H, W", None: "*spatial"}[ndim]
    conv.__doc__ = _FUNCTIONAL_DOC.format(
        what=f"{ndim}-D convolution" if ndim else "convolution",
        dims=dims,
        n=f"{ndim}d" if ndim else "*d",
        ndim_note="" if ndim else " The number of spatial dims is ``len(kernel_size)`` (an int means 2-D).",
    )
    return conv


dynamic_conv = _functional(None, "dynamic_conv")
dynamic_conv1d = _functional(1, "dynamic_conv1d")
dynamic_conv2d = _functional(2, "dynamic_conv2d")
dynamic_conv3d = _functional(3, "dynamic_conv3d")


def plan(
    input: Tensor | Sequence[int],
    generator: Generator,
    out_channels: int,
    kernel_size: int | Sequence[int],
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    padding_mode: str = "zeros",
    budget: Budget = "auto",
    chunk_size: int | None = None,
    allow_batch_coupled: bool = False,
    path: str = "auto",
    training: bool | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Plan:
    """What ``dynamic_conv`` would do on ``input`` and what it would cost, without running it.

    Takes the arguments of ``dynamic_conv``; ``input`` may be a tensor or just its shape.
    The generator is run on a few small probe batches to measure its memory (cached).

    Args:
        training: plan for forward and backward (``True``) or forward only. Default: whether
            grad mode is on and anything (the input, for a shape always assumed) needs a gradient.
        dtype: the input's dtype when ``input`` is a shape. Default: the generator's parameters'
            (else float32).
        device: the input's device when ``input`` is a shape. Default: the generator's
            parameters' (else the CPU).

    Returns:
        A frozen ``Plan``; ``print(plan)`` shows the table.

    Raises:
        BudgetTooSmallError: with the smallest budget that fits.

    Examples:
        >>> import torch, chunkconv
        >>> gen = torch.nn.Sequential(torch.nn.Linear(36, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4 * 36))
        >>> p = chunkconv.plan((2, 4, 64, 64), gen, 4, 3, padding=1, budget="64MB")
        >>> p.num_chunks >= 1 and p.forward_peak <= p.budget
        True

    """
    shape = input.shape if isinstance(input, Tensor) else tuple(input)
    spec = conv_spec_for_input(
        shape, None, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, "plan"
    )
    return plan_spec(
        input,
        generator,
        spec,
        bias,
        budget=budget,
        chunk_size=chunk_size,
        allow_batch_coupled=allow_batch_coupled,
        path=path,
        training=training,
        dtype=dtype,
        device=device,
    )
