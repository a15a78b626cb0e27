"""The fast path's chunk arithmetic: never form per-patch weights.

For a generator ``linear(body(x))`` ending in ``nn.Linear`` (detected by :mod:`chunkconv.fast`), each
chunk runs the body on its patches (``h = body(x)``) and hands ``x``, ``h`` and the last layer's
``W`` and ``c`` to the chosen backend (:mod:`.backends`: PyTorch in the chosen order, or the fused
Triton kernels). Everything else (gathering, chunking, recomputation in backward, RNG and autocast
replay, parameters as explicit Function inputs) is the shared executor's: this module only
provides the :class:`~.execute.ChunkStep`, and :func:`build_step` picks the step for a
:class:`~chunkconv.costs.PathChoice`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..binding import bind_parameters
from ..errors import FastPathUnavailableError, GeneratorOutputError
from ..execute import BoundStep, ChunkStep, GeneratorStep, call_generator, check_output_dtype
from ..forms import KernelForm
from ..geometry import ConvGeometry
from . import LinearTail, PathChoice, find_linear_tail
from .backends import BACKENDS, Backend

__all__ = ["LinearTailStep", "build_step"]


def build_step(
    generator: Callable[[Tensor], Tensor],
    param_names: Sequence[str],
    choice: PathChoice,
    geom: ConvGeometry,
    *,
    form: KernelForm | None = None,
    inputs: tuple[int, ...] = (0,),
    static: Tensor | None = None,
    tail: LinearTail | None = None,
) -> ChunkStep:
    """The :class:`~chunkconv.execute.ChunkStep` that runs ``choice`` (``param_names``: ``named_parameters()`` order).

    ``form``, ``inputs`` and ``static`` as for :class:`~chunkconv.execute.GeneratorStep`; the fast
    path takes the full form and one generator input, and ``tail``, the split :func:`chunkconv.fast.choose`
    found (detected again when not given).
    """
    if choice.path == "fast":
        assert isinstance(generator, nn.Module) and len(inputs) == 1
        return LinearTailStep.build(generator, tuple(param_names), choice, geom, inputs[0], tail)
    return GeneratorStep(generator, tuple(param_names), geom, form, inputs, static)


@dataclass(frozen=True)
class LinearTailStep:
    """The fast path's :class:`~.execute.ChunkStep`: the body, then the backend's contraction."""

    generator: nn.Module
    param_names: tuple[str, ...]  # the generator's parameters, in named_parameters() order
    choice: PathChoice
    geom: ConvGeometry
    tail: LinearTail
    source: int = 0  # which of a chunk's rows the body receives (the patches, or a side input)

    @classmethod
    def build(
        cls,
        generator: nn.Module,
        param_names: tuple[str, ...],
        choice: PathChoice,
        geom: ConvGeometry,
        source: int = 0,
        tail: LinearTail | None = None,
    ) -> LinearTailStep:
        """The step for ``choice``; ``tail`` is the split the choice found (detected again if not given)."""
        why = ""
        if tail is None:
            tail, why = find_linear_tail(generator, geom)
        if tail is None:
            raise FastPathUnavailableError(f"The fast path needs a generator ending in nn.Linear, but {why}.")
        return cls(generator, param_names, choice, geom, tail, source)

    @property
    def extras(self) -> tuple[Tensor, ...]:
        """No parameters of its own."""
        return ()

    @property
    def patch_layout(self) -> str:
        """Columns where the body computes the same from them (or does not take the patches), else rows."""
        return "columns" if self.source != 0 or self.tail.body_takes_columns else "rows"

    @property
    def backend(self) -> Backend:
        """The backend the choice named."""
        return BACKENDS[self.choice.backend or "torch"]

    @property
    def order(self) -> str:
        """The contraction order the choice named."""
        return str(self.choice.order)

    def bind(self, params: Sequence[Tensor] | None, buffers: dict[str, Tensor] | None = None) -> BoundStep:
        """The step bound to ``params`` (the generator's) and ``buffers``; ``W`` and ``c`` laid out for the backend."""
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
        self.prepared = step.backend.prepare(weight, bias, step.geom, step.order)
        self.body_leaves = [p for p in body_params if p.requires_grad]
        self.prepared_leaves = [t for t in self.prepared if t is not None and t.requires_grad]

    @property
    def leaves(self) -> list[Tensor]:
        return self.body_leaves + self.prepared_leaves

    def __call__(self, rows: Sequence[Tensor], *, values: bool = True) -> Tensor:
        step, patches = self.step, rows[0]
        h = _hidden(self.body, rows[step.source], step.tail)
        return step.backend.contract(patches, h, *self.prepared, step.geom, step.order, values=values)

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
    h = call_generator(body, [patches], "The generator's body (everything before its last nn.Linear)")
    rows = patches.shape[0]
    check_output_dtype(h, patches, "The generator's body (everything before its last nn.Linear)")
    if not isinstance(h, Tensor) or tuple(h.shape) != (rows, tail.hidden):
        got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
        raise GeneratorOutputError(
            f"The generator's body (everything before its last nn.Linear) must return one row of "
            f"{tail.hidden} features per patch: expected shape {(rows, tail.hidden)} for {rows} patches, got {got}."
        )
    return h
