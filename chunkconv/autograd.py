"""The autograd Function: forward chunk by chunk without a graph, recompute in backward.

It only wires autograd to the executor. Forward keeps the input, the bias and
the generator's parameters (as ``torch.utils.checkpoint`` does, plus the RNG
and autocast state so that recomputation replays exactly what forward did);
backward re-runs every chunk with grad enabled. The generator's parameters are
explicit inputs of the Function, so ``torch.autograd.grad``, ``backward(inputs=...)``,
hooks and DDP see them as ordinary leaves.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .execute import ChunkStep, backward_chunks, buffer_copies, forward_chunks
from .geometry import ConvGeometry

__all__ = ["DynamicConvFunction", "ForwardContext"]


@dataclass(frozen=True)
class ForwardContext:
    """Everything non-tensor the Function needs to run and to replay a call."""

    step: ChunkStep  # the path's chunk arithmetic (generic or fast)
    geom: ConvGeometry
    chunk_size: int
    out_dtype: torch.dtype


class _ReplayState:
    """RNG and autocast state captured before forward, restored around recomputation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = {
            kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            for kind in {device.type, "cpu"}
        }
        self.autocast_cache = torch.is_autocast_cache_enabled()

    def rng_advanced(self) -> bool:
        """Whether random numbers were drawn since capture (then chunks must not be re-split)."""
        if self.cuda_rng is not None and not torch.equal(torch.cuda.get_rng_state(self.device), self.cuda_rng):
            return True
        return not torch.equal(torch.get_rng_state(), self.cpu_rng)

    def replay(self, fn):
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            with contextlib.ExitStack() as stack:
                cache = self.autocast_cache
                for kind, (enabled, dtype) in self.autocast.items():
                    stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=cache))
                return fn()


class DynamicConvFunction(torch.autograd.Function):
    """``apply(input, bias, run: ForwardContext, *generator_params) -> output``."""

    @staticmethod
    def forward(ctx, input: Tensor, bias: Tensor | None, run: ForwardContext, *params: Tensor) -> Tensor:
        ctx.run = run
        ctx.replay = _ReplayState(input.device)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(input, *params)
        y, ctx.ranges = forward_chunks(input, run.step.bind(None), run.geom, run.chunk_size, run.out_dtype)
        ctx.uses_rng = ctx.replay.rng_advanced()
        if bias is not None:
            y += _broadcast_bias(bias, run.geom).to(y.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        with torch.no_grad():
            grads = DynamicConvFunction._backward(ctx, grad_y)
        if torch.is_grad_enabled():  # create_graph=True: a second derivative may be taken
            return _refuse_double_backward(grads, ctx.saved_tensors)
        return grads

    @staticmethod
    def _backward(ctx, grad_y: Tensor):
        input, *params = ctx.saved_tensors
        run: ForwardContext = ctx.run
        needs = ctx.needs_input_grad
        input_grad, bias_grad, param_needs = needs[0], needs[1], needs[3:]
        # Differentiate w.r.t. detached stand-ins, not the parameters themselves: the
        # per-chunk autograd.grad calls must not fire the user's (or DDP's) hooks on the
        # real parameters with partial gradients; autograd delivers the sum once.
        stand_ins = [p.detach().requires_grad_(need) for p, need in zip(params, param_needs)]
        grad_bias = None
        if bias_grad:
            spatial = tuple(range(2, grad_y.dim()))
            grad_bias = grad_y.sum(dim=(0, *spatial), dtype=torch.promote_types(grad_y.dtype, torch.float32))

        def recompute():
            with torch.enable_grad():
                return backward_chunks(
                    input,
                    run.step.bind(stand_ins, buffer_copies(run.step.generator)),
                    run.geom,
                    ctx.ranges,
                    grad_y,
                    input_grad=input_grad,
                    splittable=not ctx.uses_rng,
                )

        grad_x, param_grads = ctx.replay.replay(recompute)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return (grad_x, grad_bias, None, *param_grads)


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
    grad), and with the saved input and parameters as inputs of the error node
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


def _broadcast_bias(bias: Tensor, geom: ConvGeometry) -> Tensor:
    return bias.view(1, -1, *([1] * geom.ndim))
