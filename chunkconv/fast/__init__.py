"""The fast path, one subpackage; this ``__init__`` holds its decisions and availability.

Detect a Linear-terminated generator, cost its contraction orders, say whether the fused kernels
can run (:func:`~chunkconv.fast.kernels.triton_unavailable`) and choose (:func:`choose`).

When the generator ends in ``nn.Linear(hidden, out_channels * patch_size // groups)``, with
``h = body(patch)`` and that layer's ``W`` (rows indexed ``(o, p')``) and ``c``, the output is

    out[b, o] = sum_j h[b, j] * (sum_p' W[(o, p'), j] * x[b, g(o), p'])  +  sum_p' c[(o, p')] * x[b, g(o), p']

so the per-patch weights never have to exist. This module owns everything about that which is
decided from shapes and module structure alone, before any tensor work: whether a generator
qualifies (:func:`find_linear_tail`), which of the three contraction orders is cheapest
(:func:`contraction_costs`, :func:`choose_order`), how many bytes per patch the fast path's
intermediates take (:func:`fast_path_bytes_per_patch`, a cross-check), and which path, order and
backend run and why (:func:`choose_path` -> :class:`PathChoice`, plain data that a plan keeps;
the modules stay with the step). The tensor work is in :mod:`.step`, :mod:`.backends` and :mod:`.kernels`;
:func:`choose` also hands the step the split generator it found, so that it is not detected again.

The three orders, per patch, with ``G`` groups, ``Og = O / G``, ``Pg = P / G``, ``H = hidden``
(each does the same main GEMM of ``2 * O * Pg * H`` FLOPs; they differ in what they write):

* ``"weights"``: ``w = h @ W.T + c`` then ``w . x``: writes the ``O * Pg`` weights (the generic path).
* ``"patch_first"``: ``T = x_g @ W_g`` (``O * H`` values), then ``T . h``: the weights never exist.
* ``"hidden_first"``: ``A = h (x) x_g`` (``H * P`` values), then ``A @ W_g``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import PATHS, check_path
from ..costs import ORDERS, Order, PathChoice
from ..errors import FastPathUnavailableError
from ..geometry import ConvGeometry
from .kernels import triton_unavailable

__all__ = [
    "ORDERS",
    "PATHS",
    "ContractionCost",
    "FastPathBytes",
    "LinearTail",
    "PathChoice",
    "choose",
    "choose_order",
    "choose_path",
    "contraction_costs",
    "fast_path_bytes_per_patch",
    "find_linear_tail",
]

# Machine balance used to weigh bytes against FLOPs (FLOPs one byte of traffic costs). Every
# order does the same main GEMM, so this only decides between orders whose intermediates differ;
# 10 is below any current CPU or GPU (H100: ~20 fp32, ~300 bf16), i.e. it never overrates bytes.
_FLOPS_PER_BYTE = 10


@dataclass(frozen=True)
class LinearTail:
    """A generator split as ``generator(x) == linear(body(x))``.

    Attributes:
        body: the modules before the last Linear (``None`` for a bare ``nn.Linear``: ``h = x``).
        linear: the last ``nn.Linear``.
        weight_name, bias_name: the names of its parameters among the generator's
            ``named_parameters()`` (``bias_name`` is ``None`` without a bias).
        hidden: ``linear.in_features``, the width ``H`` of ``h``.

    """

    body: nn.Module | None
    linear: nn.Linear
    weight_name: str
    bias_name: str | None

    @property
    def hidden(self) -> int:
        """The width ``H`` of ``h``: the last Linear's ``in_features``."""
        return self.linear.in_features

    @property
    def body_takes_columns(self) -> bool:
        """Whether the body computes the same from a non-contiguous (transposed) patch tensor.

        True for no body and for an ``nn.Sequential`` of exact ``nn.Linear``, element-wise
        activations, ``nn.Dropout`` and ``nn.Identity`` without hooks: none of them reads
        strides (``view``) or depends on the layout. The fast path then reads the patches in
        ``F.unfold``'s column layout, copied in long contiguous runs (see :mod:`.gather`).
        """
        if self.body is None:
            return True
        modules = list(self.body) if type(self.body) is nn.Sequential else [self.body]
        return all(type(m) in _LAYOUT_FREE and not _hooked(m) for m in modules)


# Modules whose forward works on a tensor of any strides and gives the same values (exact types).
_LAYOUT_FREE: frozenset[type] = frozenset(
    {
        nn.Linear,
        nn.Identity,
        nn.Dropout,
        nn.ReLU,
        nn.ReLU6,
        nn.LeakyReLU,
        nn.PReLU,
        nn.ELU,
        nn.SELU,
        nn.CELU,
        nn.GELU,
        nn.SiLU,
        nn.Mish,
        nn.Tanh,
        nn.Sigmoid,
        nn.Softplus,
        nn.Hardtanh,
        nn.Hardswish,
        nn.Hardsigmoid,
    }
)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def find_linear_tail(generator: object, geom: ConvGeometry) -> tuple[LinearTail | None, str]:
    """Split ``generator`` into ``body`` and a last ``nn.Linear``, or say why it cannot be.

    Qualifies: an ``nn.Linear``, or an ``nn.Sequential`` whose last module is an ``nn.Linear``
    (exact types: a subclass may change ``forward``), with ``out_features`` equal to one patch's
    weight size, no forward hooks on either (a parametrized Linear is another type), and the
    Linear's parameters not shared with the body.

    Returns:
        ``(tail, reason)``: the split and a one-line description, or ``(None, reason)``.

    """
    if not isinstance(generator, nn.Module):
        return None, f"the generator is a plain callable ({type(generator).__name__}), not an nn.Module"
    body: nn.Module | None
    if type(generator) is nn.Linear:
        body, linear, prefix = None, generator, ""
    elif isinstance(generator, nn.Sequential) and type(generator) is nn.Sequential:
        if len(generator) == 0:
            return None, "the generator is an empty nn.Sequential"
        last_key = list(generator._modules)[-1]
        last = generator._modules[last_key]
        if type(last) is not nn.Linear:
            return None, f"the last module of the nn.Sequential is {type(last).__name__}, not nn.Linear"
        assert isinstance(last, nn.Linear)
        linear = last
        body = generator[:-1] if len(generator) > 1 else None
        prefix = f"{last_key}."
        if _hooked(generator):
            return None, "the nn.Sequential has forward hooks"
    else:
        return None, f"the generator is {type(generator).__name__}, not nn.Linear or an nn.Sequential ending in one"
    if _hooked(linear) or _global_hooks():
        return None, "the last nn.Linear (or every module) has forward hooks"
    if linear.out_features != geom.weight_numel:
        return None, (
            f"the last nn.Linear has out_features={linear.out_features}, not one patch's weight size "
            f"{geom.weight_numel}"
        )
    names = {id(p): n for n, p in generator.named_parameters()}
    own = {id(linear.weight)} | ({id(linear.bias)} if linear.bias is not None else set())
    if body is not None and any(id(p) in own for p in body.parameters()):
        return None, "the last nn.Linear shares its parameters with the body"
    weight_name = names.get(id(linear.weight), prefix + "weight")
    bias_name = None if linear.bias is None else names.get(id(linear.bias), prefix + "bias")
    count = len(list(generator.children()))
    kind = "nn.Linear" if body is None else f"nn.Sequential of {count} modules ending in nn.Linear"
    return LinearTail(body, linear, weight_name, bias_name), f"the generator is an {kind}"


@dataclass(frozen=True)
class ContractionCost:
    """One order's cost per patch: FLOPs, and elements of the intermediate it writes and reads."""

    order: Order
    flops: int
    intermediate: int

    def score(self, itemsize: int) -> int:
        """FLOPs plus the intermediate's traffic (written once, read once) weighed in FLOPs."""
        return self.flops + _FLOPS_PER_BYTE * 2 * self.intermediate * itemsize


def contraction_costs(geom: ConvGeometry, hidden: int) -> tuple[ContractionCost, ...]:
    """Per-patch cost of every order (see the module docstring), forward only.

    Every order does the main GEMM (``2 * O * Pg * H`` FLOPs); the extras are the bias term
    (``2 * O * Pg``), the final contraction and, for ``"hidden_first"``, the outer product.
    """
    o, h, p = geom.out_channels, hidden, geom.patch_size
    pg = p // geom.groups
    main = 2 * o * pg * h
    return (
        ContractionCost("weights", main + o * pg + 2 * o * pg, o * pg),
        ContractionCost("patch_first", main + 2 * o * h + 2 * o * pg, o * h),
        ContractionCost("hidden_first", main + h * p + 2 * o * pg, h * p),
    )


def choose_order(geom: ConvGeometry, hidden: int, dtype: torch.dtype) -> ContractionCost:
    """Return the cheapest order for these shapes (ties go to the earlier order in :data:`ORDERS`)."""
    return min(contraction_costs(geom, hidden), key=lambda c: c.score(dtype.itemsize))


@dataclass(frozen=True)
class FastPathBytes:
    """Bytes per patch the fast path's contraction allocates, forward (no grad) and backward.

    Counts the patch row, ``h``, the order's intermediate, the output row and, in backward, their
    gradients and what autograd saves; *not* the body's own activations (measure ``tail.body``).
    """

    order: Order
    forward: int
    backward: int


def fast_path_bytes_per_patch(
    geom: ConvGeometry, hidden: int, dtype: torch.dtype, order: Order | None = None
) -> FastPathBytes:
    """Count the bytes per patch of the fast path's intermediates (the planner's view).

    Args:
        geom: the call's geometry.
        hidden: the last Linear's ``in_features`` (``LinearTail.hidden``).
        dtype: the compute dtype (the result dtype under autocast).
        order: the contraction order; default: :func:`choose_order`'s.

    """
    if order is None:
        order = choose_order(geom, hidden, dtype).order
    o, h, p = geom.out_channels, hidden, geom.patch_size
    pg = p // geom.groups
    # patch_first folds the bias in as an extra hidden feature: T has O * (H + 1) values, and
    # h' = [h, 1] is a copy of h (counted whether or not there is a bias: an over-count of O + 1)
    inter = {"weights": o * pg, "patch_first": o * (h + 1) + h + 1, "hidden_first": h * p}[order]
    # forward: patches, h, intermediate, output (+ bias term's output)
    forward = p + h + inter + 2 * o
    # backward: patches and their gradient (two partial gradients summed), h and its gradient,
    # the intermediate (saved) and its gradient, output and its gradient
    backward = 3 * p + 2 * h + 2 * inter + 3 * o
    size = dtype.itemsize
    return FastPathBytes(order, forward * size, backward * size)


def choose(
    generator: Callable | nn.Module,
    geom: ConvGeometry,
    dtype: torch.dtype,
    path: str = "auto",
    *,
    device: torch.device | str = "cpu",
    order: Order | None = None,
    blocker: str | None = None,
) -> tuple[PathChoice, LinearTail | None]:
    """Pick the fast or the generic path for one call, and the fast path's backend; and the split
    generator (:class:`LinearTail`) the fast path's step runs (``None`` on the generic path).

    Args:
        generator: the user's generator.
        geom: the call's geometry.
        dtype: the compute dtype (the result dtype under autocast).
        device: where the call runs; the fused Triton kernels run on CUDA only (see
            :func:`chunkconv.fast.kernels.triton_unavailable`). Default: ``"cpu"``.
        path: ``"auto"`` (fast where the generator qualifies), ``"fast"`` (raise if it does not)
            or ``"generic"`` (always form per-patch weights). Default: ``"auto"``.
        order: force a contraction order of the PyTorch fast path. Default: the cost model's.
        blocker: why the call's own options rule the fast path out (a structured kernel form,
            several generator inputs), or ``None``.

    Raises:
        ValueError: an unknown ``path`` or ``order``.
        FastPathUnavailableError: (a ``ValueError``) ``path="fast"`` with a generator that
            does not end in ``nn.Linear``.

    """
    check_path(path)
    device = torch.device(device)
    if order is not None and order not in ORDERS:
        raise ValueError(f"Invalid value for `order`; expected one of {ORDERS} or None, got {order=}.")
    if path == "generic":
        return PathChoice("generic", "path='generic' given"), None
    if blocker is not None:
        if path == "fast":
            raise FastPathUnavailableError(
                f"path='fast' is not available for this call: {blocker}. Use path='auto' or 'generic'."
            )
        return PathChoice("generic", blocker), None
    tail, why = find_linear_tail(generator, geom)
    if tail is None:
        if path == "fast":
            raise FastPathUnavailableError(
                f"path='fast' needs a generator that is an nn.Linear or an nn.Sequential ending in one, "
                f"with out_features = out_channels * in_channels // groups * prod(kernel_size) = "
                f"{geom.weight_numel}; but {why}. Use path='auto' or 'generic'."
            )
        return PathChoice("generic", why), None
    chosen = order if order is not None else choose_order(geom, tail.hidden, dtype).order
    reason = why if path == "auto" else f"path='fast' given; {why}"
    no_triton = "order given" if order is not None else triton_unavailable(device, dtype, tail.hidden)
    choice = PathChoice(
        "fast",
        reason,
        order=chosen,
        hidden=tail.hidden,
        backend="torch" if no_triton else "triton",
        backend_reason=no_triton,
    )
    return choice, tail


def choose_path(
    generator: Callable | nn.Module,
    geom: ConvGeometry,
    dtype: torch.dtype,
    path: str = "auto",
    *,
    device: torch.device | str = "cpu",
    order: Order | None = None,
    blocker: str | None = None,
) -> PathChoice:
    """The :class:`PathChoice` of :func:`choose` alone (plain data, as a plan keeps it)."""
    return choose(generator, geom, dtype, path, device=device, order=order, blocker=blocker)[0]
