"""What is benchmarked: chunkconv (by budget, chunk size or path) and the unchunked recipes it replaces.

A :class:`Method` is a frozen, picklable description (it crosses into the measuring child process);
:meth:`Method.build` turns it into a callable ``x -> y`` for one workload, and
:meth:`Method.estimate` says from shapes alone how many bytes above the start one call needs, so a
method that cannot fit is reported as "would need X" instead of being run.

Methods:

* ``chunkconv``: :class:`chunkconv.DynamicConv` with a ``budget=`` (when the installed chunkconv
  has one), a ``chunk_size=`` or neither (the planner's default), optionally a ``path=``.
* ``forum``: the forum recipe (unfold everything, expand, multiply, sum),
  ``dynamic_conv_reference(method="forum")``.
* ``einsum``: the same recipe contracting with one batched matmul, the best unchunked recipe.
* ``checkpoint``: the einsum recipe under ``torch.utils.checkpoint`` (what a user tries next).
* ``static``: ``nn.Conv2d`` of the same shape, a fixed kernel: the floor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import chunkconv
from chunkconv.budget import format_bytes, parse_budget

from .workloads import Workload

__all__ = ["UNCHUNKED", "Method", "chunkconv_supports", "default_methods"]

# The recipes chunkconv is compared with; "best unchunked" is the best of these per metric.
UNCHUNKED = ("forum", "einsum", "checkpoint")
_KINDS = ("chunkconv", *UNCHUNKED, "static")


def chunkconv_supports(argument: str) -> bool:
    """Whether the installed ``chunkconv.DynamicConv`` takes ``argument`` (``"budget"``, ``"path"``)."""
    return argument in inspect.signature(chunkconv.DynamicConv.__init__).parameters


@dataclass(frozen=True)
class Method:
    """One way to compute the layer. ``budget``/``chunk_size``/``path`` apply to ``chunkconv`` only."""

    kind: str
    budget: str | None = None
    chunk_size: int | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Invalid value for `kind`; expected one of {_KINDS}, got kind={self.kind!r}.")
        if self.kind != "chunkconv" and (self.budget or self.chunk_size or self.path):
            raise ValueError(f"budget/chunk_size/path apply to chunkconv only, got them for kind={self.kind!r}.")

    @property
    def label(self) -> str:
        """The column name in tables and the line name in plots."""
        if self.kind != "chunkconv":
            return {"forum": "forum", "einsum": "einsum", "checkpoint": "einsum+checkpoint", "static": "static conv"}[
                self.kind
            ]
        parts = ["chunkconv"]
        if self.budget is not None:
            parts.append(self.budget)
        if self.chunk_size is not None:
            parts.append(f"chunk={self.chunk_size}")
        if self.budget is None and self.chunk_size is None:
            parts.append("default")
        if self.path is not None:
            parts.append(self.path)
        return " ".join(parts)

    @property
    def unchunked(self) -> bool:
        return self.kind in UNCHUNKED

    def as_dict(self) -> dict:
        return {"kind": self.kind, "budget": self.budget, "chunk_size": self.chunk_size, "path": self.path}

    def build(self, wl: Workload, generator: nn.Module, bias: nn.Parameter) -> tuple[Callable[[Tensor], Tensor], dict]:
        """``(fn, info)``: the call to measure, and facts about it for the report (e.g. the plan)."""
        p = wl.padding
        if self.kind == "chunkconv":
            kwargs: dict = {}
            if self.budget is not None:
                kwargs["budget"] = self.budget
            if self.chunk_size is not None:
                kwargs["chunk_size"] = self.chunk_size
            if self.path is not None:
                kwargs["path"] = self.path
            conv = chunkconv.DynamicConv(generator, wl.channels, wl.out_channels, wl.kernel, padding=p, **kwargs)
            conv.bias = bias
            return conv, {"module": repr(conv).splitlines()[0]}
        if self.kind == "static":
            conv = nn.Conv2d(wl.channels, wl.out_channels, wl.kernel, padding=p, device=bias.device, dtype=bias.dtype)
            return conv, {}
        recipe = "forum" if self.kind == "forum" else "einsum"

        def unchunked(x: Tensor) -> Tensor:
            return chunkconv.dynamic_conv_reference(
                x, generator, out_channels=wl.out_channels, kernel_size=wl.kernel, padding=p, bias=bias, method=recipe
            )

        if self.kind == "checkpoint":
            return (lambda x: checkpoint(unchunked, x, use_reentrant=False)), {}
        return unchunked, {}

    def plan_info(self, conv: object, x: Tensor, training: bool) -> dict:
        """chunkconv's plan for ``x`` (``plan``: printed; ``plan_summary``: one line), when it can say."""
        if self.kind != "chunkconv" or not hasattr(conv, "plan"):
            return {}
        try:
            plan = conv.plan(x, training=training)
        except Exception as error:  # a report detail: never fail a measurement over it
            return {"plan_summary": f"(plan unavailable: {type(error).__name__}: {error})"}
        summary = f"{plan.num_chunks:,} chunk{'s' if plan.num_chunks != 1 else ''} of {plan.chunk_size:,}"
        peaks = [(n, v) for n, v in (("fwd", plan.forward_peak), ("bwd", plan.backward_peak)) if v is not None]
        if peaks:
            summary += "; planned peak " + ", ".join(f"{n} {format_bytes(v)}" for n, v in peaks)
        if plan.budget is not None:
            summary += f" (budget {format_bytes(plan.budget)})"
        return {"plan": str(plan), "plan_summary": summary}

    def estimate(self, wl: Workload, mode: str, itemsize: int) -> int:
        """Bytes above the start that one call needs, from shapes (a deliberate over-estimate).

        Per patch: ``P`` unfolded features, ``2 * hidden`` (Linear output and ReLU output), ``W``
        generated weights, ``out`` outputs. The forum recipe adds a product as large as the
        weights; with autograd, backward adds a gradient as large as the weights (the forum
        recipe two). The input gradient is ``C`` per patch. Calibrated on the H100 numbers
        recorded in benchmarks/workloads.py (forum: 2x the weights inference, 3x training;
        einsum: 1x and 2x).
        """
        m, pp, h, o, w, c = wl.num_patches, wl.patch_size, wl.hidden, wl.out_channels, wl.weight_numel, wl.channels
        train = mode == "fwd+bwd"
        weight_copies = {"forum": 3 if train else 2, "einsum": 2 if train else 1, "checkpoint": 2 if train else 1}
        if self.kind in weight_copies:
            return m * (pp + 2 * h + weight_copies[self.kind] * w + o + (c if train else 0)) * itemsize
        if self.kind == "static":
            return m * (2 * pp + o + (c if train else 0)) * itemsize
        unchunked = Method("einsum").estimate(wl, mode, itemsize)
        fixed = m * (o + (2 * c if train else 0)) * itemsize
        rows = min(m, self.chunk_size or max(1, 32 * 2**20 // (w * itemsize)))  # the planner's default chunk
        working = 2 * rows * (pp + 2 * h + 3 * w) * itemsize
        if self.budget not in (None, "auto"):
            working = min(working, parse_budget(self.budget))
        return min(unchunked, fixed + working)


def default_methods(device: str, *, sweep: bool = False) -> list[Method]:
    """The methods of a suite: several chunkconv settings, the three unchunked recipes, static conv.

    With ``budget=`` in the installed chunkconv: budgets 256MB/1GB/4GB on CUDA, 64MB/256MB on the
    CPU, plus "auto"; before it, chunk sizes. A sweep keeps the middle setting and auto/default.
    With ``path=``, chunkconv auto/default runs on both the generic and the fast path.
    """
    if chunkconv_supports("budget"):
        settings = [
            Method("chunkconv", budget=b) for b in (("256MB", "1GB", "4GB") if device != "cpu" else ("64MB", "256MB"))
        ]
        settings.append(Method("chunkconv", budget="auto"))
    else:
        settings = [Method("chunkconv", chunk_size=c) for c in (1024, 16384)]
        settings.append(Method("chunkconv"))
    if sweep:
        settings = [settings[(len(settings) - 1) // 2], settings[-1]]
    if chunkconv_supports("path"):
        last = settings.pop()
        settings += [
            Method("chunkconv", budget=last.budget, chunk_size=last.chunk_size, path=p) for p in ("generic", "fast")
        ]
    return [*settings, Method("forum"), Method("einsum"), Method("checkpoint"), Method("static")]
