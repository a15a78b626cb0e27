"""The fast path's chunk arithmetic: never form per-patch weights.

For a generator ``linear(body(x))`` ending in ``nn.Linear`` (detected by :mod:`.fastpath`), each
chunk runs the body on its patches (``h = body(x)``) and contracts ``x``, ``h`` and the last
layer's ``W`` and ``c`` in the order :mod:`.fastpath` chose, or with the fused Triton kernels
(:mod:`.kernels`) on CUDA. Everything else (patch gathering, chunking, recomputation in backward,
RNG and autocast replay, parameters as explicit Function inputs) is the shared executor's
(:mod:`.execute`, :mod:`.autograd`): this module only provides the :class:`~.execute.ChunkStep`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import GeneratorOutputError
from .execute import bind_parameters, contract
from .fastpath import LinearTail, PathChoice
from .geometry import ConvGeometry

__all__ = ["LinearTailStep", "contract_chunk", "prepare_tail"]


@dataclass(frozen=True)
class LinearTailStep:
    """The fast path's :class:`~.execute.ChunkStep` (``order`` ``"triton"`` = the fused kernels)."""

    generator: nn.Module
    param_names: tuple[str, ...]  # the generator's parameters, in named_parameters() order
    choice: PathChoice
    geom: ConvGeometry

    @property
    def tail(self) -> LinearTail:
        assert self.choice.tail is not None
        return self.choice.tail

    @property
    def order(self) -> str:
        return "triton" if self.choice.backend == "triton" else str(self.choice.order)

    def bind(self, params: Sequence[Tensor] | None, buffers: dict[str, Tensor] | None = None) -> _BoundLinearTail:
        own = params is None
        values = tuple(p for _, p in self.generator.named_parameters()) if params is None else tuple(params)
        by_name = dict(zip(self.param_names, values))
        tail = self.tail
        weight = by_name[tail.weight_name]
        bias = by_name[tail.bias_name] if tail.bias_name is not None else None
        names = tuple(n for n in self.param_names if n not in (tail.weight_name, tail.bias_name))
        body_params = [by_name[n] for n in names]
        body: Callable[[Tensor], Tensor]
        if tail.body is None:
            body = _identity
        elif own and not buffers:
            body = tail.body
        else:
            body = bind_parameters(tail.body, {**dict(zip(names, body_params)), **(buffers or {})})
        return _BoundLinearTail(self, values, body, weight, bias, body_params)


def _identity(x: Tensor) -> Tensor:
    return x


class _BoundLinearTail:
    """The fast step for one call: ``W`` and ``c`` laid out once, and chained back once."""

    def __init__(
        self,
        step: LinearTailStep,
        params: tuple[Tensor, ...],
        body: Callable[[Tensor], Tensor],
        weight: Tensor,
        bias: Tensor | None,
        body_params: list[Tensor],
    ) -> None:
        self.step, self.params, self.body = step, params, body
        self.tail_params = [t for t in (weight, bias) if t is not None and t.requires_grad]
        self.prepared = prepare_tail(weight, bias, step.geom, step.order)
        self.body_leaves = [p for p in body_params if p.requires_grad]
        self.prepared_leaves = [t for t in self.prepared if t is not None and t.requires_grad]

    @property
    def leaves(self) -> list[Tensor]:
        return self.body_leaves + self.prepared_leaves

    def __call__(self, patches: Tensor) -> Tensor:
        step = self.step
        return contract_chunk(patches, _hidden(self.body, patches, step.tail), *self.prepared, step.geom, step.order)

    def param_grads(self, leaf_grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        n = len(self.body_leaves)
        found: dict[int, Tensor | None] = {id(p): g for p, g in zip(self.body_leaves, leaf_grads[:n])}
        summed = [(t, g) for t, g in zip(self.prepared_leaves, leaf_grads[n:]) if g is not None]
        if self.tail_params and summed:
            outs, grads = zip(*summed)
            tail_grads = torch.autograd.grad(outs, self.tail_params, grads, allow_unused=True)
            found.update({id(t): g for t, g in zip(self.tail_params, tail_grads)})
        return [found.get(id(p)) if p.requires_grad else None for p in self.params]


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
    if order == "triton" and torch.is_autocast_enabled(weight.device.type):
        # the kernels are no autocast op: cast W and c once per call here (triton_contract
        # casts each chunk's patches and h; W and c then already have the dtype)
        dtype = torch.get_autocast_dtype(weight.device.type)
        return weight.to(dtype), None if bias is None else bias.to(dtype)
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
