"""The autograd Function: forward chunk by chunk without a graph, recompute in backward.

It only wires autograd to the executor. Forward keeps the streamed sources (the input), the bias
and the generator's parameters (as ``torch.utils.checkpoint`` does, plus the RNG and autocast
state so that recomputation replays exactly what forward did, and copies of the generator's
buffers as forward found them, so that a generator updating them replays from the same values);
backward re-runs every chunk with grad enabled. The generator's parameters are explicit inputs of the Function, so
``torch.autograd.grad``, ``backward(inputs=...)``, hooks and DDP see them as ordinary leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .binding import buffer_copies
from .execute import ChunkStep, Executor, add_bias
from .geometry import ConvGeometry
from .progress import progress_bar
from .replay import ReplayState, rng_lock
from .streams import StreamSpec

__all__ = ["DynamicConvFunction", "ForwardContext"]


@dataclass(frozen=True)
class ForwardContext:
    """Everything non-tensor the Function needs to run and to replay a call.

    ``streams`` are the per-location inputs a chunk reads, in order (default: the input's
    patches alone); the Function takes their source tensors (``arity`` each) after the bias.
    """

    step: ChunkStep  # the path's chunk arithmetic (generic or fast)
    geom: ConvGeometry
    chunk_size: int
    out_dtype: torch.dtype
    streams: tuple[StreamSpec, ...] = ()
    progress: bool = False

    @property
    def executor(self) -> Executor:
        """The driver that runs the call (the one the planner's probes ran)."""
        return Executor(self.step, self.geom, self.streams, self.out_dtype)

    @property
    def num_sources(self) -> int:
        """How many of the Function's tensor inputs are streamed sources."""
        return self.executor.num_sources


class DynamicConvFunction(torch.autograd.Function):
    """``apply(run: ForwardContext, bias, *sources, *generator_params) -> output``."""

    @staticmethod
    def forward(ctx: Any, run: ForwardContext, bias: Tensor | None, *tensors: Tensor) -> Tensor:
        """Run every chunk without a graph; save the sources and parameters, the RNG and autocast state."""
        sources = tensors[: run.num_sources]
        device = sources[0].device
        ctx.run = run
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(*tensors)
        ctx.buffers = buffer_copies(run.step.generator)  # as forward sees them: backward replays from these
        # one unbroken run of the random stream per call, even with other threads training (see .replay)
        with rng_lock(), progress_bar(run.progress, run.geom.num_patches, "chunkconv forward") as tick:
            ctx.replay = ReplayState.capture(device)
            y, ctx.ranges = run.executor.forward(sources, run.chunk_size, progress=tick)
            ctx.uses_rng = ctx.replay.rng.advanced()
        return add_bias(y, bias)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple:
        """Recompute every chunk with grad enabled; the gradients of the bias, the sources and the parameters."""
        with torch.no_grad():
            grads = DynamicConvFunction._backward(ctx, grad_y)
        if torch.is_grad_enabled():  # create_graph=True: a second derivative may be taken
            return _refuse_double_backward(grads, ctx.saved_tensors)
        return grads

    @staticmethod
    def _backward(ctx: Any, grad_y: Tensor) -> tuple:
        run: ForwardContext = ctx.run
        count = run.num_sources
        saved = ctx.saved_tensors
        sources, params = saved[:count], saved[count:]
        needs = ctx.needs_input_grad
        bias_grad, source_needs, param_needs = needs[1], needs[2 : 2 + count], needs[2 + count :]
        # Differentiate w.r.t. detached stand-ins, not the parameters themselves: the
        # per-chunk autograd.grad calls must not fire the user's (or DDP's) hooks on the
        # real parameters with partial gradients; autograd delivers the sum once.
        stand_ins = [p.detach().requires_grad_(need) for p, need in zip(params, param_needs)]
        grad_bias = None
        if bias_grad:
            spatial = tuple(range(2, grad_y.dim()))
            grad_bias = grad_y.sum(dim=(0, *spatial), dtype=torch.promote_types(grad_y.dtype, torch.float32))
            grad_bias = grad_bias.to(ctx.bias_dtype)

        def recompute() -> tuple[list[Tensor | None], list[Tensor | None]]:
            description = "chunkconv backward (recomputing each chunk)"
            with torch.enable_grad(), progress_bar(run.progress, run.geom.num_patches, description) as tick:
                return run.executor.backward(
                    sources,
                    source_needs,
                    ctx.ranges,
                    grad_y,
                    bound=run.step.bind(stand_ins, {name: b.clone() for name, b in ctx.buffers.items()}),
                    splittable=not ctx.uses_rng,
                    progress=tick,
                )

        source_grads, param_grads = ctx.replay.replay(recompute)
        return (None, grad_bias, *source_grads, *param_grads)


_DOUBLE_BACKWARD_MESSAGE = (
    "chunkconv does not support double backward (differentiating a gradient that flowed through "
    "a dynamic convolution, as gradient penalties and Hessian-vector products do): its backward "
    "recomputes every chunk without recording a graph. For such a term, use "
    "chunkconv.dynamic_conv_reference (unchunked, plain autograd) with the same generator and arguments."
)


def _refuse_double_backward(grads: tuple, saved: tuple[Tensor, ...]) -> tuple:
    """Return ``grads`` as tensors whose own backward raises a clear error.

    As ``torch.autograd.function.once_differentiable`` does, but unconditionally
    under ``create_graph=True`` (not only when the upstream gradient requires
    grad), and with the saved inputs and parameters as inputs of the error node
    too, so that differentiating a gradient with respect to them reaches the
    error: otherwise a gradient penalty would silently miss this layer's
    contribution instead of failing.
    """
    tensors = [g for g in grads if isinstance(g, Tensor)]
    if not tensors:
        return grads
    sources = [t for t in saved if t.requires_grad]
    err = torch._C._functions.DelayedError(_DOUBLE_BACKWARD_MESSAGE.encode(), len(tensors) + len(sources))
    wrapped = iter(err(*[g.detach().requires_grad_() for g in tensors], *sources))
    return tuple(next(wrapped) if isinstance(g, Tensor) else g for g in grads)
