"""Helpers for testing code that uses chunkconv: hypothesis strategies and assertions.

Importing this module needs ``hypothesis``, which ``import chunkconv`` does not:
``pip install "chunkconv[testing]"``. The strategies draw valid dynamic-convolution
configurations with small, bounded sizes; ``assert_matches_reference`` compares a
chunkconv call with the unchunked oracle, output and gradients, and prints the failing call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

try:
    from hypothesis import strategies as st
except ModuleNotFoundError as error:
    if error.name is not None and error.name.partition(".")[0] != "hypothesis":
        raise  # hypothesis is there but something it imports is not: that error says more
    raise ImportError('chunkconv.testing needs hypothesis: pip install "chunkconv[testing]"') from None

from .geometry import PADDING_MODES, ConvSpec, conv_spec

__all__ = [
    "Concat",
    "ConvCase",
    "RecordingDropout",
    "assert_matches_reference",
    "conv_cases",
    "mlp_generator",
]


class _ConvArguments(Protocol):
    """What :func:`mlp_generator` reads of a convolution: a ``DynamicConv`` layer or a ``ConvSpec``."""

    @property
    def in_channels(self) -> int: ...  # noqa: D102
    @property
    def out_channels(self) -> int: ...  # noqa: D102
    @property
    def kernel_size(self) -> tuple[int, ...]: ...  # noqa: D102
    @property
    def groups(self) -> int: ...  # noqa: D102


def mlp_generator(
    spec: _ConvArguments,
    hidden: int = 8,
    *,
    activation: type[nn.Module] = nn.Tanh,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """``Linear(P, hidden) -> activation -> Linear(hidden, weight size)``, the typical generator.

    Args:
        spec: the convolution the generator is for (its patch size and weight size): a
            ``chunkconv.DynamicConv`` layer (what the top level exports) or a ``ConvSpec``.
        hidden: width of the hidden layer. Default: ``8``.
        activation: the module between the two layers. Default: ``nn.Tanh`` (smooth, so
            ``gradcheck`` does not trip on kinks).
        dtype: dtype of the parameters. Default: ``torch.float64``.
        device: where to create the parameters. Default: ``None`` (the CPU).

    Returns:
        An ``nn.Sequential`` mapping ``(B, P)`` patch rows to ``(B, weight size)`` flat weights.

    """
    patch = spec.in_channels * math.prod(spec.kernel_size)
    weight = spec.out_channels * spec.in_channels // spec.groups * math.prod(spec.kernel_size)
    return nn.Sequential(nn.Linear(patch, hidden), activation(), nn.Linear(hidden, weight)).to(
        device=device, dtype=dtype
    )


class Concat(nn.Module):
    """A generator of several inputs: concatenates the rows it receives, then ``Linear -> Tanh -> Linear``.

    For ``inputs=("patches", "features")`` and the like (the rows arrive positionally, in the
    order ``inputs`` names them).

    Args:
        width: the concatenated rows' width (the sum of every input's).
        out: what it makes per location (the kernel form's entries).
        hidden: width of the hidden layer. Default: ``5``.

    """

    def __init__(self, width: int, out: int, hidden: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self, *rows: Tensor) -> Tensor:
        """``body(cat(rows))``."""
        return self.body(torch.cat(rows, dim=1))


class RecordingDropout(nn.Module):
    """Dropout that records every mask it draws, or applies ``fixed`` masks instead.

    For checking that recomputation in backward draws the masks forward drew: compare
    ``masks`` after forward with ``masks`` after backward, or set ``fixed`` to the forward's
    masks (concatenated) to build the function whose gradient backward must have computed.

    Args:
        p: the probability of zeroing an element. Default: ``0.5``.

    Attributes:
        masks: every mask drawn, in order (forward's chunks, then backward's recomputations).
        fixed: masks to apply instead of drawing, or ``None`` (draw and record). Default: ``None``.

    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p
        self.masks: list[Tensor] = []
        self.fixed: Tensor | None = None

    def forward(self, h: Tensor) -> Tensor:
        """Dropout of ``h``, recording the mask it drew."""
        if self.fixed is not None:
            return h * self.fixed / (1 - self.p)
        mask = (torch.rand_like(h) > self.p).to(h.dtype)
        self.masks.append(mask)
        return h * mask / (1 - self.p)


@dataclass(frozen=True)
class ConvCase:
    """One drawn configuration: the arguments, the input shape and a chunk size.

    Attributes:
        spec: the checked convolution arguments (a ``ConvSpec``).
        input_shape: the input's shape, batched or not.
        chunk_size: patches per chunk, from 1 to a little more than all of them.
        bias: whether to add a bias.
        kwargs: the arguments for ``chunkconv.dynamic_conv`` after the generator
            (``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups``,
            ``padding_mode``).

    """

    spec: ConvSpec
    input_shape: tuple[int, ...]
    chunk_size: int
    bias: bool
    kwargs: dict = field(repr=False)

    @property
    def num_patches(self) -> int:
        """The number of output locations, ``N * L``."""
        batched = self.input_shape if len(self.input_shape) == self.spec.ndim + 2 else (1, *self.input_shape)
        return math.prod(self.spec.geometry(batched).out_spatial) * batched[0]


def _min_size(kernel: int, dilation: int, pads: tuple[int, int], mode: str) -> int:
    receptive = dilation * (kernel - 1) + 1
    need = max(1, receptive - sum(pads))
    if mode == "reflect":
        need = max(need, max(pads) + 1)
    elif mode == "circular":
        need = max(need, max(pads))
    return need


@st.composite
def conv_cases(
    draw: st.DrawFn,
    *,
    ndims: Sequence[int] = (1, 2, 3),
    max_batch: int = 3,
    allow_unbatched: bool = True,
    allow_empty: bool = True,
) -> ConvCase:
    """Draw a valid configuration over every argument ``nn.Conv*d`` takes.

    A hypothesis strategy: call it without ``draw`` (``conv_cases(ndims=(2,))``) and pass it
    to ``@given``. Sizes are bounded so that the unchunked reference stays cheap: at most
    4 channels, kernels up to 3, a few dozen patches per image.

    Args:
        draw: supplied by hypothesis, not by the caller.
        ndims: which numbers of spatial dims to draw. Default: ``(1, 2, 3)``.
        max_batch: the largest batch size. Default: ``3``.
        allow_unbatched: also draw unbatched inputs. Default: ``True``.
        allow_empty: also draw a batch of 0. Default: ``True``.

    Returns:
        A strategy of ``ConvCase`` objects.

    """
    ndim = draw(st.sampled_from(tuple(ndims)), label="ndim")
    groups = draw(st.sampled_from((1, 2)), label="groups")
    in_channels = groups * draw(st.integers(1, 2), label="in_per_group")
    out_channels = groups * draw(st.integers(1, 2), label="out_per_group")
    max_k = (4, 3, 2)[ndim - 1]
    kernel = tuple(draw(st.lists(st.integers(1, max_k), min_size=ndim, max_size=ndim), label="kernel_size"))
    dilation = tuple(draw(st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim), label="dilation"))
    padding = draw(
        st.one_of(
            st.sampled_from(("same", "valid")),
            st.lists(st.integers(0, 2), min_size=ndim, max_size=ndim).map(tuple),
        ),
        label="padding",
    )
    if padding == "same":
        stride = (1,) * ndim
    else:
        stride = tuple(draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim), label="stride"))
    padding_mode = draw(st.sampled_from(PADDING_MODES), label="padding_mode")
    spec = conv_spec(
        ndim,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
    if padding == "same":
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    elif padding == "valid":
        pads = [(0, 0)] * ndim
    else:
        assert not isinstance(padding, str), padding
        pads = [(p, p) for p in padding]
    span = (7, 4, 2)[ndim - 1]
    spatial = tuple(
        draw(st.integers(lo, lo + span), label=f"size[{i}]")
        for i, lo in enumerate(_min_size(k, d, p, padding_mode) for k, d, p in zip(kernel, dilation, pads))
    )
    batch = draw(st.integers(0 if allow_empty else 1, max_batch), label="batch")
    unbatched = allow_unbatched and batch == 1 and draw(st.booleans(), label="unbatched")
    shape = (in_channels, *spatial) if unbatched else (batch, in_channels, *spatial)
    geom = spec.geometry(shape if not unbatched else (1, *shape))
    chunk_size = draw(st.integers(1, max(1, geom.num_patches + 2)), label="chunk_size")
    bias = draw(st.booleans(), label="bias")
    kwargs = dict(
        out_channels=out_channels,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
    return ConvCase(spec, shape, chunk_size, bias, kwargs)


def assert_matches_reference(
    run: Callable[[Tensor], Tensor],
    reference: Callable[[Tensor], Tensor],
    x: Tensor,
    wrt: Sequence[Tensor] = (),
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    context: str = "",
) -> None:
    """Assert ``run(x)`` equals ``reference(x)``, and so do the gradients of ``x`` and ``wrt``.

    One random upstream gradient is used for both.

    Args:
        run: the call under test, taking ``x``.
        reference: the call it must equal, taking ``x`` (e.g. ``chunkconv.dynamic_conv_reference``).
        x: the input; its gradient is compared when it requires one.
        wrt: more tensors whose gradients are compared (e.g. the generator's parameters).
        rtol: relative tolerance, as for ``torch.allclose``; the default suits float64.
        atol: absolute tolerance, as for ``torch.allclose``; the default suits float64.
        context: text appended to a failure message (e.g. the call).

    Raises:
        AssertionError: naming the tensor that differs (output or which gradient), the largest
            difference and ``context``.

    """
    leaves = ([x] if x.requires_grad else []) + [t for t in wrt if t.requires_grad]
    got, want = run(x), reference(x)
    _assert_close(got, want, "output", rtol, atol, context)
    if not leaves or got.numel() == 0:
        return
    upstream = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, leaves, upstream, allow_unused=True)
    want_grads = torch.autograd.grad(want, leaves, upstream, allow_unused=True)
    names = (["input"] if x.requires_grad else []) + [f"wrt[{i}]" for i, t in enumerate(wrt) if t.requires_grad]
    for name, g, w in zip(names, got_grads, want_grads):
        g = torch.zeros_like(leaves[names.index(name)]) if g is None else g
        w = torch.zeros_like(leaves[names.index(name)]) if w is None else w
        _assert_close(g, w, f"gradient of {name}", rtol, atol, context)


def _assert_close(got: Tensor, want: Tensor, what: str, rtol: float, atol: float, context: str) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}\n{context}")
    if got.dtype != want.dtype:
        raise AssertionError(f"{what}: dtype {got.dtype} != reference {want.dtype}\n{context}")
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        diff = (got - want).abs().max().item()
        raise AssertionError(f"{what} differs from the reference: max abs diff {diff:.3e}\n{context}")
