"""The functional API: validate everything, plan, then run.

``dynamic_conv1d/2d/3d`` (and ``dynamic_conv``, which takes the number of
spatial dims from ``kernel_size``) check every argument and the generator
before any tensor work, choose the path (:func:`~chunkconv.fastpath.choose_path`:
the fast path for generators ending in ``nn.Linear``, the generic path for the
rest, or the one ``path=`` forces), ask the planner for a chunking, and run it
through the path's autograd Function when a gradient is needed or straight
through its executor when not (no saved tensors under ``torch.no_grad``/``inference_mode``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .autograd import DynamicConvFunction, ForwardContext
from .errors import BatchCoupledGeneratorError
from .execute import forward_chunks
from .fast_execute import FastDynamicConvFunction, FastRun, forward_chunks_fast
from .fastpath import choose_path
from .geometry import ConvGeometry, ConvSpec, conv_spec
from .planner import Plan, make_plan

__all__ = [
    "dynamic_conv",
    "dynamic_conv1d",
    "dynamic_conv2d",
    "dynamic_conv3d",
]

Generator = Callable[[Tensor], Tensor]

# Modules whose output for one row depends on the other rows of the same call
# when given a 2-D (B, features) tensor: chunking would change their results.
_ATTENTION_TYPES = (
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


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


def _check_generator(generator: Generator, x: Tensor, allow_batch_coupled: bool) -> dict[str, Tensor]:
    """Refuse generators that cannot work on ``x``; return the parameters autograd must track."""
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
    if not isinstance(generator, nn.Module):
        return {}
    params = dict(generator.named_parameters())
    autocast = torch.is_autocast_enabled(x.device.type)
    for name, tensor in [*generator.named_parameters(), *generator.named_buffers()]:
        if tensor.device != x.device:
            raise ValueError(
                f"The generator's {name!r} is on {tensor.device} but the input is on {x.device}; "
                "expected both on the same device (move the generator with .to(device))."
            )
        if not autocast and tensor.is_floating_point() and tensor.dtype != x.dtype:
            raise ValueError(
                f"The generator's {name!r} has dtype {tensor.dtype} but the input has dtype {x.dtype}; "
                "expected the same dtype (convert one with .to(dtype), or run under torch.autocast)."
            )
    return params


def _result_dtype(x: Tensor) -> torch.dtype:
    """The output dtype torch's conv would give for ``x`` under the current autocast state."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _check_bias(bias: Tensor | None, x: Tensor, out_channels: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"Invalid type for `bias`; expected a Tensor or None, got {type(bias).__name__}.")
    if tuple(bias.shape) != (out_channels,):
        raise ValueError(
            f"Invalid shape for `bias`; expected ({out_channels},) for out_channels={out_channels}, "
            f"got {tuple(bias.shape)}."
        )
    if bias.device != x.device:
        raise ValueError(f"`bias` is on {bias.device} but the input is on {x.device}; expected the same device.")


def _batched(input: object, ndim: int, op: str) -> tuple[Tensor, bool]:
    if not isinstance(input, Tensor):
        raise TypeError(f"Invalid type for `input` of {op}; expected a Tensor, got {type(input).__name__}.")
    if input.dim() not in (ndim + 1, ndim + 2):
        raise ValueError(
            f"Expected {ndim + 1}-D (unbatched) or {ndim + 2}-D (batched) input to {op}, "
            f"got input of shape {tuple(input.shape)}."
        )
    if not input.is_floating_point():
        raise TypeError(f"Expected a floating-point input to {op}, got dtype {input.dtype}.")
    unbatched = input.dim() == ndim + 1
    return (input.unsqueeze(0) if unbatched else input), unbatched


def _check_channels(input: Tensor, unbatched: bool, in_channels: int) -> None:
    channels = input.shape[0 if unbatched else 1]
    if channels != in_channels:
        raise ValueError(
            f"Expected input with {in_channels} channels (in_channels={in_channels}), "
            f"got {channels} channels in input of shape {tuple(input.shape)}."
        )


def prepare(
    input: Tensor,
    generator: Generator,
    spec: ConvSpec,
    bias: Tensor | None,
    *,
    chunk_size: int | None,
    allow_batch_coupled: bool,
    op: str,
    path: str = "auto",
) -> tuple[Tensor, bool, ConvGeometry, dict[str, Tensor], Plan]:
    """Every check, the path and the plan, before any tensor work."""
    x, unbatched = _batched(input, spec.ndim, op)
    _check_channels(input, unbatched, spec.in_channels)
    geom = spec.geometry(x.shape)
    _check_bias(bias, x, spec.out_channels)
    params = _check_generator(generator, x, allow_batch_coupled)
    dtype = _result_dtype(x)
    choice = choose_path(generator, geom, dtype, path, device=x.device)
    plan = make_plan(geom, dtype=dtype, chunk_size=chunk_size, path=choice)
    return x, unbatched, geom, params, plan


def apply_spec(
    input: Tensor,
    generator: Generator,
    spec: ConvSpec,
    bias: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    allow_batch_coupled: bool = False,
    op: str = "dynamic_conv",
    path: str = "auto",
) -> Tensor:
    """Run a checked :class:`ConvSpec` (the shared body of the functions and the modules)."""
    x, unbatched, geom, params, plan = prepare(
        input, generator, spec, bias, chunk_size=chunk_size, allow_batch_coupled=allow_batch_coupled, op=op, path=path
    )
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, *params.values(), *([bias] if bias is not None else []))
    )
    # The one place the path is taken: plan.path says which and why (str(plan) shows it).
    if plan.path is not None and plan.path.path == "fast":
        fast = FastRun(generator, tuple(params), plan.path, geom, plan.chunk_size, _result_dtype(x))  # type: ignore[arg-type]
        if needs_grad:
            y = FastDynamicConvFunction.apply(x, bias, fast, *params.values())
        else:
            y = forward_chunks_fast(x, fast, tuple(params.values()))
    elif needs_grad:
        run = ForwardContext(generator, tuple(params), geom, plan.chunk_size, _result_dtype(x))
        y = DynamicConvFunction.apply(x, bias, run, *params.values())
    else:
        y = forward_chunks(x, generator, geom, plan.chunk_size, _result_dtype(x))
    if not needs_grad and bias is not None:
        y += bias.view(1, -1, *([1] * geom.ndim)).to(y.dtype)
    return y.squeeze(0) if unbatched else y


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
        chunk_size: int | None = None,
        allow_batch_coupled: bool = False,
        path: str = "auto",
    ) -> Tensor:
        d = ndim
        if d is None:
            d = len(kernel_size) if isinstance(kernel_size, Sequence) else 2
        if not isinstance(input, Tensor):
            raise TypeError(f"Invalid type for `input` of {op}; expected a Tensor, got {type(input).__name__}.")
        channel_dim = 0 if input.dim() == d + 1 else 1
        if input.dim() <= channel_dim:
            raise ValueError(f"Expected {d + 1}-D or {d + 2}-D input to {op}, got shape {tuple(input.shape)}.")
        spec = conv_spec(
            d,
            in_channels=input.shape[channel_dim],
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
        )
        return apply_spec(
            input,
            generator,
            spec,
            bias,
            chunk_size=chunk_size,
            allow_batch_coupled=allow_batch_coupled,
            op=op,
            path=path,
        )

    conv.__name__ = conv.__qualname__ = op
    return conv


dynamic_conv = _functional(None, "dynamic_conv")
dynamic_conv1d = _functional(1, "dynamic_conv1d")
dynamic_conv2d = _functional(2, "dynamic_conv2d")
dynamic_conv3d = _functional(3, "dynamic_conv3d")
