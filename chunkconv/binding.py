"""Calling the user's generator with other tensors in place of its parameters and buffers.

Backward and the planner's probes differentiate through detached stand-ins rather than the real
parameters, so the user's hooks (and DDP's) never see partial, per-chunk gradients, and in-place
buffer updates during a recomputation or a probe land on copies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["bind_parameters", "buffer_copies"]


def buffer_copies(generator: object) -> dict[str, Tensor]:
    """Copies of the generator's buffers, for recomputation that must leave the real ones alone."""
    if not isinstance(generator, nn.Module):
        return {}
    return {name: b.clone() for name, b in generator.named_buffers()}


def bind_parameters(generator: Callable[[Tensor], Tensor], tensors: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """``generator`` called with ``tensors`` (by name) in place of its parameters and buffers."""
    if not tensors:
        return generator
    return lambda patches: torch.func.functional_call(generator, tensors, (patches,))  # type: ignore[arg-type]
