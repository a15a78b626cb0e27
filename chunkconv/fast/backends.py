"""The fast path's backends: who computes the contraction of patches, ``h``, ``W`` and ``c``.

The contraction *order* (which intermediate is formed; :mod:`chunkconv.fast` chooses it from shapes) and
the *backend* (which code runs it) are separate choices. Each backend says whether it can run for a
device, dtype and hidden width, and why not (:meth:`unavailable`, shown in the plan); lays out ``W``
and ``c`` once per call (:meth:`prepare`); and contracts one chunk (:meth:`contract`):

* :data:`TORCH`: PyTorch GEMMs in the chosen order, everywhere.
* :data:`TRITON`: the fused kernels of :mod:`.kernels` (CUDA; Triton's CPU interpreter in tests),
  which never form an order's intermediate in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..forms import contract
from ..geometry import ConvGeometry
from .patch_first import patch_first

__all__ = ["BACKENDS", "TORCH", "TRITON", "Backend", "TorchBackend", "TritonBackend"]


@dataclass(frozen=True)
class TorchBackend:
    """PyTorch GEMMs in the order :mod:`chunkconv.fast` chose (see its module docstring)."""

    name: str = "torch"

    def unavailable(self, device: torch.device, dtype: torch.dtype, hidden: int) -> str | None:
        """Why it cannot run here (``None``: PyTorch runs everywhere)."""
        return None

    def prepare(
        self, weight: Tensor, bias: Tensor | None, geom: ConvGeometry, order: str
    ) -> tuple[Tensor, Tensor | None]:
        """``W`` and ``c`` laid out once per call for ``order``'s GEMMs (differentiable).

        ``W`` is ``(O * Pg, H)`` with rows ``(o, p')``, viewed as ``(G, Og, Pg, H)``. ``"patch_first"``
        takes ``(G, Pg, Og * H')``, with ``c`` folded in as an extra hidden feature (``H' = H + 1``,
        the feature always 1; ``H' = H`` without a bias): one GEMM computes both terms, and no
        bias is returned. ``"hidden_first"`` takes ``(G, H * Pg, Og)`` and ``c`` as ``(G, Pg, Og)``.
        ``"weights"`` takes ``W`` and ``c`` as they are.
        """
        if order == "weights":
            return weight, bias
        g = geom.groups
        og, pg = geom.out_channels // g, geom.patch_size // g
        w4 = weight.view(g, og, pg, -1)
        if order == "patch_first":
            w = w4.permute(0, 2, 1, 3)  # (G, Pg, Og, H)
            if bias is not None:  # folded in as an (H + 1)-th hidden feature that is always 1
                folded = bias.view(g, og, pg).transpose(1, 2).unsqueeze(-1).to(w.dtype)
                with torch.autocast(weight.device.type, enabled=False):  # a layout change, not an op to cast
                    w = torch.cat([w, folded], dim=-1)
            return w.reshape(g, pg, -1), None
        w = w4.permute(0, 3, 2, 1).reshape(g, -1, og)  # hidden_first
        c = None if bias is None else bias.view(g, og, pg).transpose(1, 2)
        return w, c

    def contract(
        self,
        patches: Tensor,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        geom: ConvGeometry,
        order: str,
        *,
        values: bool = True,
    ) -> Tensor:
        """One chunk's output ``(B, O)`` from patches ``(B, P)``, ``h`` ``(B, H)`` and prepared ``W``, ``c``.

        ``values=False`` (backward's recompute): the output's values may be left unset
        (:func:`.patch_first.patch_first`).
        """
        if order == "weights":
            return contract(F.linear(h, weight, bias), patches, geom)
        if order == "patch_first":
            return patch_first(patches, h, weight, geom, values=values)
        rows, g = patches.shape[0], geom.groups
        pg = geom.patch_size // g
        outs = []
        for k in range(g):
            x = patches[:, k * pg : (k + 1) * pg]
            outer = (h.unsqueeze(2) * x.unsqueeze(1)).reshape(rows, -1)  # (B, H * Pg)
            out = outer @ weight[k]
            if bias is not None:
                out = out + x @ bias[k]
            outs.append(out)
        return outs[0] if g == 1 else torch.cat(outs, dim=1)


@dataclass(frozen=True)
class TritonBackend:
    """The fused Triton kernels (:mod:`.kernels`); the order does not apply to them."""

    name: str = "triton"

    def unavailable(self, device: torch.device, dtype: torch.dtype, hidden: int) -> str | None:
        """Why the fused kernels cannot run for this device, dtype and hidden width, or ``None``."""
        from .kernels import triton_unavailable  # imports no Triton

        return triton_unavailable(device, dtype, hidden)

    def prepare(
        self, weight: Tensor, bias: Tensor | None, geom: ConvGeometry, order: str
    ) -> tuple[Tensor, Tensor | None]:
        """``W`` and ``c`` as they are, cast once per call under autocast (the kernels are no autocast op)."""
        if torch.is_autocast_enabled(weight.device.type):
            # the kernels are no autocast op: cast W and c once per call here (triton_contract
            # casts each chunk's patches and h; W and c then already have the dtype)
            dtype = torch.get_autocast_dtype(weight.device.type)
            return weight.to(dtype), None if bias is None else bias.to(dtype)
        return weight, bias

    def contract(
        self,
        patches: Tensor,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        geom: ConvGeometry,
        order: str,
        *,
        values: bool = True,
    ) -> Tensor:
        """One chunk's output ``(B, O)`` from the fused kernels (which always compute it)."""
        from .kernels import triton_contract

        return triton_contract(patches, h, weight, bias, geom)


Backend = TorchBackend | TritonBackend
TORCH = TorchBackend()
TRITON = TritonBackend()
BACKENDS: dict[str, Backend] = {b.name: b for b in (TORCH, TRITON)}
