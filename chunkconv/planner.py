"""Choose chunk sizes over the patch dimension from shapes alone.

The planner never touches the input tensor: it works on a
:class:`~chunkconv.geometry.ConvGeometry`, dtypes and byte counts, and returns
a frozen, printable :class:`Plan` that the executor runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .fastpath import PathChoice
from .geometry import ConvGeometry

__all__ = ["Plan", "make_plan"]

# Without a budget, aim for chunks whose generated weights take about this much:
# large enough to keep matmuls efficient, small enough to stay in cache on CPU.
_DEFAULT_CHUNK_WEIGHT_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Plan:
    """How one call is split: ``num_chunks`` chunks of ``chunk_size`` patches, on which path."""

    geometry: ConvGeometry
    chunk_size: int
    reason: str
    path: PathChoice | None = None

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.geometry.num_patches / self.chunk_size)

    def __str__(self) -> str:
        g = self.geometry
        return (
            f"Plan: {g.num_patches} patches (N={g.batch} x L={g.locations_per_image}) of "
            f"{g.patch_size} features -> {self.num_chunks} chunks of {self.chunk_size} ({self.reason})"
            + (f"; {self.path}" if self.path is not None else "")
        )


def make_plan(
    geom: ConvGeometry,
    *,
    dtype: torch.dtype,
    chunk_size: int | None = None,
    path: PathChoice | None = None,
) -> Plan:
    """The chunking for one call; ``chunk_size`` (patches per chunk) overrides the choice.

    On the fast path (``path``), the default chunk holds as many patches as the generic path's
    would, or more where the fast path's intermediates per patch are smaller than the weights.
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"Invalid value for `chunk_size`; expected an int >= 1, got {chunk_size=}.")
        return Plan(geom, chunk_size, "chunk_size given", path)
    per_patch = geom.weight_numel * dtype.itemsize
    if path is not None and path.bytes_per_patch is not None:
        per_patch = min(per_patch, path.bytes_per_patch.forward)
    size = max(1, min(geom.num_patches, _DEFAULT_CHUNK_WEIGHT_BYTES // per_patch))
    return Plan(geom, size, "default chunk size", path)
