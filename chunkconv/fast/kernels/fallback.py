"""When the fused kernels fail at run time, the same contraction in PyTorch (imports no Triton).

A Triton failure at run time (importing Triton, compiling a kernel, launching it, or the
autotuner's benchmark) must not take a user's run down. :func:`guarded` runs a kernel stage and,
if it raises, computes that stage with PyTorch instead: the forward as
``contract(F.linear(h, W, c), x, geom)`` (in the order that forms the smaller intermediate), the
backward as PyTorch autograd on the same formula. The result is the same up to floating-point
rounding, as between any two contraction orders.

Each failure is reported once per distinct reason with a ``RuntimeWarning`` (``warnings.warn``,
so ``-W error`` and pytest's filters apply; the traceback goes to the ``chunkconv`` logger at
DEBUG), and remembered for its configuration (:func:`config_key`: device, dtypes, shapes, groups,
bias, TF32) so that later chunks of that configuration go straight to PyTorch instead of
compiling and failing again. :func:`failures` lists what failed in this process (the doctor
prints it). ``torch.OutOfMemoryError`` is not a kernel failure: it propagates, so the executor
retries the chunk in smaller pieces; ``KeyboardInterrupt`` and ``SystemExit`` are no
``Exception`` and propagate too.

The PyTorch computation forms a ``(B, Og, min(H, Pg))`` intermediate per group where the kernels
form none, so a fallen-back chunk may need more memory than its plan counted for the kernels;
should it run out, the executor's retry in smaller chunks applies.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ...forms import contract
from ...geometry import ConvGeometry

__all__ = ["KernelConfig", "config_key", "failures", "guarded", "torch_contract", "torch_contract_backward"]

_log = logging.getLogger("chunkconv")
_failed: dict[tuple[str, Hashable | None], str] = {}  # (stage, config) -> the reason
_warned: set[tuple[str, str]] = set()
T = TypeVar("T")


@dataclass(frozen=True)
class KernelConfig:
    """What a kernel's compilation depends on: a failure is remembered for one of these."""

    device: str
    dtype: torch.dtype
    hidden_dtype: torch.dtype
    weight_dtype: torch.dtype
    patch_features: int
    hidden: int
    out_channels: int
    groups: int
    bias: torch.dtype | None
    tf32: bool

    def __str__(self) -> str:
        dtypes = {str(t)[6:] for t in (self.dtype, self.hidden_dtype, self.weight_dtype)}
        return (
            f"{self.device}, {'/'.join(sorted(dtypes))}, {self.patch_features} patch features, hidden {self.hidden}, "
            f"out_channels={self.out_channels}, groups={self.groups}, {'with' if self.bias else 'no'} bias"
            + (", TF32" if self.tf32 else "")
        )


def config_key(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, geom: ConvGeometry) -> KernelConfig:
    """The configuration of one contraction (device, dtypes, shapes, TF32), rows aside."""
    from . import tf32_allowed

    return KernelConfig(
        str(x.device),
        x.dtype,
        h.dtype,
        weight.dtype,
        x.shape[1],
        weight.shape[1],
        geom.out_channels,
        geom.groups,
        None if bias is None else bias.dtype,
        x.device.type == "cuda" and x.dtype == torch.float32 and tf32_allowed(),
    )


def failures() -> list[dict[str, str]]:
    """The kernel stages that failed in this process and fell back to PyTorch, with the reasons."""
    return [
        {"stage": stage, "config": _describe(config), "reason": reason} for (stage, config), reason in _failed.items()
    ]


def guarded(stage: str, config: Hashable | None, kernels: Callable[[], T], pytorch: Callable[[], T]) -> T:
    """``kernels()``, or ``pytorch()`` if ``stage`` failed before for ``config`` or fails now.

    ``config`` is a :class:`KernelConfig`, or ``None`` for a stage that does not depend on it.
    """
    if (stage, config) in _failed:
        return pytorch()
    try:
        return kernels()
    except torch.OutOfMemoryError:
        raise  # the executor retries the chunk in smaller pieces
    except Exception as error:  # any failure of the kernels falls back, once per configuration
        _record(stage, config, error)
    return pytorch()


def _record(stage: str, config: Hashable | None, error: Exception) -> None:
    reason = _reason(error)
    _failed[(stage, config)] = reason
    _log.debug("chunkconv: Triton %s failed for %s", stage, _describe(config), exc_info=error)
    if (stage, reason) not in _warned:
        _warned.add((stage, reason))
        warnings.warn(
            f"chunkconv: the fused Triton kernels failed ({stage}: {reason}); this configuration "
            f"({_describe(config)}) runs its contraction in PyTorch instead, with the same result, and later "
            "chunks skip the kernels. Warned once per reason; the traceback is logged on the 'chunkconv' "
            "logger at DEBUG. Set CHUNKCONV_TRITON=0 to turn the kernels off.",
            RuntimeWarning,
            stacklevel=2,
        )


def _reason(error: Exception) -> str:
    """The error's type and gist: its first line, and its last (a CompilationError's first lines are source)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    gist = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    if len(gist) > 300:
        gist = gist[:297] + "..."
    return f"{type(error).__name__}: {gist}" if gist else type(error).__name__


def _describe(config: Hashable | None) -> str:
    return "every configuration" if config is None else str(config)


def torch_contract(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
    """The kernels' ``y (B, O)`` in PyTorch (differentiable); see :mod:`.contract` for the layouts."""
    with torch.autocast(x.device.type, enabled=False):  # the kernels' dtypes: the caller has cast already
        rows, g = x.shape[0], geom.groups
        og, pg = geom.out_channels // g, geom.patch_size // g
        hidden = weight.shape[1]
        if hidden >= pg:  # per-patch weights (B, O, Pg): the recipe's formula
            return contract(F.linear(h, weight, bias), x, geom)
        # the smaller intermediate: T = x W, (B, G, Og, H), then y = T . h (+ x . c)
        w4 = weight.view(g, og, pg, hidden)
        t = torch.einsum("bgp,gopj->bgoj", x.view(rows, g, pg), w4)
        y = torch.einsum("bgoj,bj->bgo", t, h)
        if bias is not None:
            y = y + torch.einsum("bgp,gop->bgo", x.view(rows, g, pg), bias.view(g, og, pg))
        return y.reshape(rows, geom.out_channels)


def torch_contract_backward(
    gy: Tensor, x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, geom: ConvGeometry, needs: tuple[bool, ...]
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The kernels' gradients of ``x``, ``h``, ``W`` and ``c`` (those ``needs`` asks for), by PyTorch autograd."""
    inputs = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip((x, h, weight, bias), needs)]
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads: Iterator[Tensor | None] = iter(())
    if wanted:
        with torch.enable_grad():
            xs, hs, ws, cs = inputs
            assert xs is not None and hs is not None and ws is not None
            y = torch_contract(xs, hs, ws, cs, geom)
            grads = iter(torch.autograd.grad(y, wanted, gy, allow_unused=True))
    out: list[Tensor | None] = []
    for t in inputs:
        if t is None or not t.requires_grad:
            out.append(None)
        else:
            grad = next(grads)
            out.append(torch.zeros_like(t) if grad is None else grad)
    return out[0], out[1], out[2], out[3]
