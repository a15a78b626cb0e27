"""The package's exception hierarchy: one base class for everything chunkconv raises itself."""

from __future__ import annotations

__all__ = [
    "BatchCoupledGeneratorError",
    "BudgetTooSmallError",
    "ChunkConvError",
    "FastPathUnavailableError",
    "GeneratorCallError",
    "GeneratorOutputError",
    "ShardedGeneratorError",
    "UnsupportedError",
    "UntrackedGradientError",
]


class ChunkConvError(Exception):
    """Base class of chunkconv's own errors (bad values still raise ``ValueError``)."""


class GeneratorOutputError(ChunkConvError, ValueError):
    """The generator returned something other than one weight per patch."""


class BatchCoupledGeneratorError(ChunkConvError, ValueError):
    """The generator mixes patches of one call (e.g. BatchNorm in training mode).

    Its result would depend on how the patches are chunked, so chunkconv refuses
    it unless the caller opts in with ``allow_batch_coupled=True``.
    """


class ShardedGeneratorError(ChunkConvError, ValueError):
    """The generator is sharded by FSDP, whose gather-and-free around its forward fights the recomputation."""


class FastPathUnavailableError(ChunkConvError, ValueError):
    """``path="fast"`` was asked for a call the fast path cannot run (the message says why)."""


class UntrackedGradientError(ChunkConvError, ValueError):
    """The generator uses tensors needing a gradient that chunkconv cannot see (they would get none).

    A plain callable closing over parameters, or a module that reads tensors other than its registered
    parameters (TorchScript or compiled modules, layers in a plain list), in training.
    """


class BudgetTooSmallError(ChunkConvError, ValueError):
    """Even the smallest chunk does not fit in the memory budget."""

    def __init__(self, message: str, *, budget: int, minimum: int) -> None:
        super().__init__(message)
        self.budget = budget
        self.minimum = minimum


class GeneratorCallError(ChunkConvError, RuntimeError):
    """The user's generator raised; the message says with which inputs, the original is chained."""


class UnsupportedError(ChunkConvError, NotImplementedError):
    """A transform chunkconv does not support (``torch.func``, forward-mode AD)."""
