"""Calling the user's generator with other tensors in place of its parameters and buffers.

Backward and the planner's probes differentiate through detached stand-ins rather than the real
parameters, so the user's hooks (and DDP's) never see partial, per-chunk gradients, and in-place
buffer updates during a recomputation or a probe land on copies.

The user's module is never modified, not even for a moment: :func:`bind_parameters` builds a
*shadow* of it, a tree of shallow copies of its submodules whose parameter and buffer tables hold
the stand-ins, and calls that. (``torch.func.functional_call`` instead swaps the stand-ins into the
module and back, which corrupts a layer that two threads train at once, and lets a forward that
runs mid-swap read stand-ins.) Building a shadow copies no tensor data: it costs a few
microseconds per submodule, once per bound call.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["bind_parameters", "buffer_copies"]


def buffer_copies(generator: object) -> dict[str, Tensor]:
    """Copies of the generator's buffers, for recomputation that must leave the real ones alone."""
    if not isinstance(generator, nn.Module):
        return {}
    return {name: b.clone() for name, b in generator.named_buffers()}


def bind_parameters(generator: Callable[[Tensor], Tensor], tensors: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """``generator`` called with ``tensors`` (by parameter or buffer name) in place of its own.

    Tied parameters (one tensor under several names) take the stand-in of the name
    ``named_parameters()`` reports. Names that the module does not have raise ``KeyError``.
    """
    if not tensors or not isinstance(generator, nn.Module):
        return generator
    own: dict[str, Tensor] = dict(generator.named_parameters(remove_duplicate=False))
    own.update(generator.named_buffers(remove_duplicate=False))
    by_id: dict[int, Tensor] = {}
    for name, tensor in tensors.items():
        if name not in own:
            raise KeyError(f"The generator has no parameter or buffer named {name!r}.")
        by_id[id(own[name])] = tensor
    return _shadow(generator, by_id, {})


def _shadow(module: nn.Module, by_id: dict[int, Tensor], memo: dict[int, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` and its submodules with tensors replaced per ``by_id``; shared ones stay shared."""
    found = memo.get(id(module))
    if found is not None:
        return found
    clone = object.__new__(type(module))  # not copy.copy: parametrized modules refuse to be pickled
    memo[id(module)] = clone
    state = clone.__dict__
    state.update(module.__dict__)
    state["_parameters"] = {k: _swap(v, by_id) for k, v in module._parameters.items()}
    state["_buffers"] = {k: _swap(v, by_id) for k, v in module._buffers.items()}
    state["_modules"] = {k: None if m is None else _shadow(m, by_id, memo) for k, m in module._modules.items()}
    return clone


def _swap(tensor: Tensor | None, by_id: dict[int, Tensor]) -> Tensor | None:
    return None if tensor is None else by_id.get(id(tensor), tensor)
