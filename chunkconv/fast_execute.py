"""Run the fast path: chunked, never forming per-patch weights, recomputed in backward.

Same discipline as the generic path (:mod:`.execute`, :mod:`.autograd`): patches are gathered per
chunk from a strided view of the padded input, forward runs without a graph, backward replays the
RNG and autocast state and recomputes each chunk, and the generator's parameters are explicit
inputs of the autograd Function, differentiated through detached stand-ins. What differs is the
chunk's arithmetic: the body runs on the patches (``h = body(x)``) and the last Linear's ``W``
and ``c`` are contracted with ``x`` and ``h`` in the order :mod:`.fastpath` chose, or by the fused
Triton kernels (:mod:`.kernels`) on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autograd import _broadcast_bias, _ReplayState
from .errors import GeneratorOutputError
from .execute import ChunkIndex, _output_rows, chunk_ranges, contract, gather_patches, pad_input, scatter_patch_grads
from .fastpath import LinearTail, PathChoice
from .geometry import ConvGeometry

__all__ = ["FastDynamicConvFunction", "FastRun", "contract_chunk", "forward_chunks_fast", "prepare_tail"]


@dataclass(frozen=True)
class FastRun:
    """Everything non-tensor the fast path needs to run and to replay a call."""

    generator: nn.Module
    param_names: tuple[str, ...]  # the generator's parameters, in the order passed to apply()
    choice: PathChoice
    geom: ConvGeometry
    chunk_size: int
    out_dtype: torch.dtype

    @property
    def tail(self) -> LinearTail:
        assert self.choice.tail is not None
        return self.choice.tail

    @property
    def order(self) -> str:
        """``"triton"`` when the fused kernels run, else the PyTorch contraction order."""
        return "triton" if self.choice.backend == "triton" else str(self.choice.order)

    def split(self, params: Sequence[Tensor]) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor | None, list[Tensor]]:
        """``(body, W, c, body_params)`` with ``params`` in place of the generator's parameters."""
        by_name = dict(zip(self.param_names, params))
        tail = self.tail
        weight = by_name[tail.weight_name]
        bias = by_name[tail.bias_name] if tail.bias_name is not None else None
        own = {tail.weight_name, tail.bias_name}
        names = tuple(n for n in self.param_names if n not in own)
        body_params = [by_name[n] for n in names]
        if tail.body is None:
            return (lambda x: x), weight, bias, body_params
        return _bind(tail.body, dict(zip(names, body_params))), weight, bias, body_params


def _bind(module: nn.Module, tensors: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """Call ``module`` with ``tensors`` in place of its parameters of those names."""
    if not tensors:
        return module
    return lambda x: torch.func.functional_call(module, tensors, (x,))


def _hidden(body: Callable[[Tensor], Tensor], patches: Tensor, tail: LinearTail) -> Tensor:
    h = body(patches)
    rows = patches.shape[0]
    if not isinstance(h, Tensor) or tuple(h.shape) != (rows, tail.hidden):
        got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
        raise GeneratorOutputError(
            f"The generator's body (everything before its last nn.Linear) must return one row of "
            f"{tail.hidden} features per patch: expected shape {(rows, tail.hidden)} for {rows} patches, got {got}."
        )
    return h


def prepare_tail(weight: Tensor, bias: Tensor | None, geom: ConvGeometry, order: str) -> tuple[Tensor, Tensor | None]:
    """``W`` and ``c`` laid out once per call for ``order``'s GEMMs (differentiable).

    ``W`` is ``(O * Pg, H)`` with rows ``(o, p')``, viewed as ``(G, Og, Pg, H)``. ``"patch_first"``
    takes ``(G, Pg, Og * H)``, ``"hidden_first"`` ``(G, H * Pg, Og)``; the bias term takes ``c`` as
    ``(G, Pg, Og)``. ``"weights"`` and ``"triton"`` take ``W`` and ``c`` as they are.
    """
    if order in ("weights", "triton"):
        return weight, bias
    g = geom.groups
    og, pg = geom.out_channels // g, geom.patch_size // g
    w4 = weight.view(g, og, pg, -1)
    if order == "patch_first":
        w = w4.permute(0, 2, 1, 3).reshape(g, pg, -1)
    else:  # hidden_first
        w = w4.permute(0, 3, 2, 1).reshape(g, -1, og)
    c = None if bias is None else bias.view(g, og, pg).transpose(1, 2)
    return w, c


def contract_chunk(
    patches: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, geom: ConvGeometry, order: str
) -> Tensor:
    """One chunk's output ``(B, O)`` from patches ``(B, P)``, ``h`` ``(B, H)`` and prepared ``W``, ``c``."""
    if order == "triton":
        from .kernels import triton_contract

        return triton_contract(patches, h, weight, bias, geom)
    if order == "weights":
        return contract(F.linear(h, weight, bias), patches, geom)
    rows, g = patches.shape[0], geom.groups
    og, pg = geom.out_channels // g, geom.patch_size // g
    outs = []
    for k in range(g):
        x = patches[:, k * pg : (k + 1) * pg]
        if order == "patch_first":
            t = (x @ weight[k]).view(rows, og, -1)  # (B, Og, H)
            out = torch.bmm(t, h.unsqueeze(-1)).squeeze(-1)
        else:  # hidden_first
            outer = (h.unsqueeze(2) * x.unsqueeze(1)).reshape(rows, -1)  # (B, H * Pg)
            out = outer @ weight[k]
        if bias is not None:
            out = out + x @ bias[k]
        outs.append(out)
    return outs[0] if g == 1 else torch.cat(outs, dim=1)


def forward_chunks_fast(x: Tensor, run: FastRun, params: Sequence[Tensor]) -> Tensor:
    """Compute the output ``(N, O, *out_spatial)``, without the conv bias, one chunk at a time."""
    geom = run.geom
    y = torch.empty((geom.batch, geom.out_channels, *geom.out_spatial), dtype=run.out_dtype, device=x.device)
    rows = _output_rows(y, geom)
    x_pad = pad_input(x, geom)
    body, weight, bias, _ = run.split(params)
    w, c = prepare_tail(weight, bias, geom, run.order)
    for start, end in chunk_ranges(geom.num_patches, run.chunk_size):
        chunk = ChunkIndex.build(start, end, geom, x.device)
        patches = gather_patches(x_pad, chunk, geom)
        out = contract_chunk(patches, _hidden(body, patches, run.tail), w, c, geom, run.order)
        rows[chunk.image, chunk.flat] = out.to(run.out_dtype)
    return y


def _backward_chunks_fast(
    x: Tensor, run: FastRun, params: Sequence[Tensor], grad_y: Tensor, *, input_grad: bool
) -> tuple[Tensor | None, list[Tensor | None]]:
    """Recompute every chunk; gradients of ``x`` and ``params`` (RNG/autocast replayed by the caller)."""
    geom = run.geom
    body, weight, bias, body_params = run.split(params)
    tail_leaves = [t for t in (weight, bias) if t is not None and t.requires_grad]
    wanted = [p for p in body_params if p.requires_grad]
    if not (input_grad or wanted or tail_leaves):
        return None, [None] * len(params)
    x_leaf = x.detach().requires_grad_(input_grad)
    x_pad = pad_input(x_leaf, geom)
    source = x_pad.detach()
    grad_pad = torch.zeros(source.shape, dtype=x.dtype, device=x.device) if input_grad else None
    grad_rows = _output_rows(grad_y, geom)
    prepared = prepare_tail(weight, bias, geom, run.order)
    prep = [t for t in prepared if t is not None and t.requires_grad]
    sums: list[Tensor | None] = [None] * (len(wanted) + len(prep))
    for start, end in chunk_ranges(geom.num_patches, run.chunk_size):
        chunk = ChunkIndex.build(start, end, geom, x.device)
        patches = gather_patches(source, chunk, geom).requires_grad_(input_grad)
        out = contract_chunk(patches, _hidden(body, patches, run.tail), *prepared, geom, run.order)
        targets = ([patches] if input_grad else []) + wanted + prep
        grads = torch.autograd.grad(out, targets, grad_rows[chunk.image, chunk.flat].to(out.dtype), allow_unused=True)
        if input_grad:
            assert grad_pad is not None
            if grads[0] is not None:
                scatter_patch_grads(grad_pad, grads[0].to(grad_pad.dtype), chunk, geom)
            grads = grads[1:]
        for i, g in enumerate(grads):
            if g is not None:
                sums[i] = g if sums[i] is None else sums[i] + g  # type: ignore[operator]
    body_sums, prep_sums = sums[: len(wanted)], sums[len(wanted) :]
    found: dict[int, Tensor | None] = {id(p): s for p, s in zip(wanted, body_sums)}
    if tail_leaves and any(s is not None for s in prep_sums):
        outs = [t for t, s in zip(prep, prep_sums) if s is not None]
        tail_grads = torch.autograd.grad(outs, tail_leaves, [s for s in prep_sums if s is not None], allow_unused=True)
        found.update({id(t): g for t, g in zip(tail_leaves, tail_grads)})
    grad_x = None
    if input_grad:
        assert grad_pad is not None
        grad_x = grad_pad if x_pad is x_leaf else torch.autograd.grad(x_pad, x_leaf, grad_pad)[0]
    return grad_x, [found.get(id(p)) if p.requires_grad else None for p in params]


class FastDynamicConvFunction(torch.autograd.Function):
    """``apply(input, bias, run: FastRun, *generator_params) -> output`` (see :mod:`.autograd`)."""

    @staticmethod
    def forward(ctx, input: Tensor, bias: Tensor | None, run: FastRun, *params: Tensor) -> Tensor:
        ctx.run = run
        ctx.replay = _ReplayState(input.device)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(input, *params)
        y = forward_chunks_fast(input, run, params)
        if bias is not None:
            y += _broadcast_bias(bias, run.geom).to(y.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        input, *params = ctx.saved_tensors
        run: FastRun = ctx.run
        needs = ctx.needs_input_grad
        input_grad, bias_grad, param_needs = needs[0], needs[1], needs[3:]
        # detached stand-ins, as in DynamicConvFunction: hooks on the real parameters fire once
        stand_ins = [p.detach().requires_grad_(need) for p, need in zip(params, param_needs)]
        grad_bias = None
        if bias_grad:
            spatial = tuple(range(2, grad_y.dim()))
            grad_bias = grad_y.sum(dim=(0, *spatial), dtype=torch.promote_types(grad_y.dtype, torch.float32))
            grad_bias = grad_bias.to(ctx.bias_dtype)
        grad_y = grad_y.contiguous()

        def recompute():
            with torch.enable_grad():
                return _backward_chunks_fast(input, run, stand_ins, grad_y, input_grad=input_grad)

        grad_x, param_grads = ctx.replay.replay(recompute)
        return (grad_x, grad_bias, None, *param_grads)
