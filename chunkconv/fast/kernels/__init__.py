"""Fused Triton kernels for the fast path, imported lazily: Triton is optional.

Importing this package imports no Triton. :func:`triton_unavailable` says, from the device and
dtype alone, why the kernels cannot run (``None`` when they can); the fast path then falls back
to its PyTorch contraction and logs the reason on CUDA (once per reason, on the ``chunkconv``
logger). :func:`triton_contract` imports :mod:`.contract` (and Triton) on first use; if Triton
fails at run time, it computes the chunk in PyTorch instead and warns once (:mod:`.fallback`).

The kernels run on CUDA for float32 (TF32 when torch's flags allow it for CUDA matmuls: see
:func:`tf32_allowed`), float16 and bfloat16. With ``TRITON_INTERPRET=1`` in the environment
*before Triton is first imported*, they also run on CPU tensors in Triton's interpreter (float64
too): that is how the tests check them without a GPU. ``CHUNKCONV_TRITON=0`` turns them off.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from types import ModuleType

import torch
from torch import Tensor

from ...geometry import ConvGeometry

__all__ = ["interpreting", "tf32_allowed", "triton_contract", "triton_unavailable"]

_log = logging.getLogger("chunkconv")
_logged: set[str] = set()
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tf32_allowed() -> bool:
    """Whether torch lets float32 CUDA matmuls use TF32, as cuBLAS would.

    Reads ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9), which reflects both the new
    API and the legacy ones (``allow_tf32``, ``torch.set_float32_matmul_precision``); reading
    ``allow_tf32`` itself raises once a user has set the new API.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)  # torch < 2.9


# Hidden widths up to this run in the kernels: the widest T tile (BO * HP columns) their configs hold.
# The one definition: the kernels' config pruning reads it too; wider hidden layers use PyTorch.
MAX_HIDDEN = 256


def triton_unavailable(device: torch.device, dtype: torch.dtype, hidden: int = 1) -> str | None:
    """Why the fused kernels cannot run for ``device``, ``dtype`` and ``hidden``, or ``None`` if they can."""
    reason = _reason(device, dtype)
    if reason is None and hidden > MAX_HIDDEN:
        reason = f"the last Linear's in_features={hidden} is above the kernels' {MAX_HIDDEN}"
    if reason is not None and device.type == "cuda" and reason not in _logged:
        _logged.add(reason)
        _log.warning("chunkconv fast path: using the PyTorch contraction, not Triton: %s", reason)
    return reason


def _reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if os.environ.get("CHUNKCONV_TRITON", "1") == "0":
        return "turned off by CHUNKCONV_TRITON=0"
    interp = interpreting()
    if device.type != "cuda" and not interp:
        return f"the input is on {device.type}, and the kernels run on CUDA"
    allowed = (*_GPU_DTYPES, torch.float64) if interp else _GPU_DTYPES
    if dtype not in allowed:
        return f"dtype {dtype} is not one of {', '.join(str(d) for d in allowed)}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda" and not interp and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # bf16 and TF32 dots need Ampere; the kernels are compile-checked for sm_80/sm_90
            return f"the GPU's compute capability is {major}.{minor}, and the kernels need 8.0 (Ampere) or newer"
    return None


def triton_contract(patches: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
    """Contract one chunk with the fused kernels (differentiable); see :mod:`.contract`.

    If Triton fails at run time (import, compilation, launch, autotuning; forward or backward),
    the chunk is computed in PyTorch instead, with the same result, and a ``RuntimeWarning`` says
    why, once per reason; see :mod:`.fallback`.
    """
    from . import fallback

    kind = patches.device.type
    if torch.is_autocast_enabled(kind):  # a custom Function is not autocast: cast as matmul would
        dtype = torch.get_autocast_dtype(kind)
        patches, h, weight = patches.to(dtype), h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    args = (patches, h, weight, bias, geom)

    def pytorch() -> Tensor:
        return fallback.torch_contract(*args)

    contract_module = fallback.guarded("import", None, _import_contract, lambda: None)
    if contract_module is None:
        return pytorch()
    key = fallback.config_key(*args)
    return fallback.guarded("forward", key, lambda: contract_module.TritonContract.apply(*args), pytorch)


def _import_contract() -> ModuleType:
    from . import contract

    return contract
