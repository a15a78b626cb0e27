"""How chunkconv presents itself to ``torch.compile``: as one opaque call, run eagerly.

Dynamo could trace into the chunk loop, but not through the autograd
Function's backward (it calls ``torch.autograd.grad`` per chunk); left alone it
falls back to eager for the whole calling frame and compiles fragments of the
forward (with its own RNG, so that the eager recomputation in backward would no
longer replay the same dropout masks). :func:`opaque_to_compile` makes the call
one clean graph break instead: the code around it compiles, the call itself
runs eagerly, generator included. ``torch._dynamo`` is only imported when
something is being compiled, so eager users do not pay for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["opaque_to_compile"]

_F = TypeVar("_F", bound=Callable)


def opaque_to_compile(fn: _F) -> _F:
    """Wrap ``fn`` so that ``torch.compile`` graph-breaks at it and runs it (recursively) eagerly."""
    # torch's own lazily-importing form of torch.compiler.disable (torch/_compile.py, used by
    # torch.optim); dynamo skips its wrapper, which then calls torch._dynamo.disable(fn).
    disabled = torch._disable_dynamo(fn, recursive=True)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # torch.compile(fullgraph=True) shows the next line where it refuses the graph break:
            return disabled(*args, **kwargs)  # chunkconv: a graph break BY DESIGN (each call runs eagerly, chunk by chunk; its backward cannot be traced): compile without fullgraph=True, see chunkconv's docs/training.md  # noqa: E501  # fmt: skip
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
