"""Kernel forms: what the generator returns for a location, and how it meets the patch.

* ``"full"``: a whole weight ``(out, in / groups, *k)`` per location, applied to the patch (one
  small matrix-vector product per location).
* ``"modulated"``: per-tap scalars ``(*k)`` (or per input channel and tap, ``(in, *k)``) that
  scale a learnable static weight ``(out, in / groups, *k)``, as pixel-adaptive convolution and
  DCNv2's mask do. Computed without forming per-location weights: the chunk's patch rows are
  scaled, then multiplied by the static weight in one GEMM (an ordinary unfold convolution's cost),
  a cache-sized block of locations at a time (:mod:`.modulated`).
* ``"shared"``: one kernel ``(*k)`` per group of channels, ``(G, *k)``, applied depthwise (as
  involution, kernel prediction and spatially varying blur do): ``out = in`` channels, channel
  ``c`` filtered with the kernel of group ``c // (in / G)`` (consecutive channels share). Never
  forms an ``(out, in)`` weight.

Each form is a :class:`KernelForm` subclass (:class:`Full`, :class:`Modulated`, :class:`Shared`)
that owns its name, the arguments it accepts (:meth:`KernelForm.check`), the per-location shapes
the generator may return (:attr:`KernelForm.shapes`, checked by :meth:`KernelForm.generated`), the
contraction with the chunk's patch rows (:meth:`KernelForm.apply`), why the fast path cannot run
it (:attr:`KernelForm.fast_path_blocker`), the entries it makes per location and the text the plan
prints (:meth:`KernelForm.describe`). :data:`FORM_CLASSES` lists them by the name ``kernel=``
takes. Pure shape logic plus a few tensor ops per chunk. The structured forms contract patch rows
in either layout of :mod:`.gather` (the same values), passed to :meth:`KernelForm.apply`
explicitly: contiguous rows, or the ``"columns"`` layout, which they compute in as ``nn.Conv2d``'s
im2col path does (output rows then come back as the transpose of a contiguous ``(out, B)`` result).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .errors import GeneratorOutputError
from .geometry import ConvGeometry
from .modulated import modulate

__all__ = [
    "FORMS",
    "FORM_CLASSES",
    "Full",
    "KernelForm",
    "Modulated",
    "Shared",
    "check_form",
    "contract",
    "make_form",
]


def check_form(kernel: object, kernel_groups: object, in_channels: int, out_channels: int, groups: int) -> int:
    """Check a form's arguments against the convolution's; return the number of kernel groups.

    Raises:
        ValueError: an unknown form, or arguments the form cannot take.

    """
    if kernel not in FORMS:
        raise ValueError(f"Invalid value for `kernel`; expected one of {FORMS}, got kernel={kernel!r}.")
    return FORM_CLASSES[str(kernel)].check(kernel_groups, in_channels, out_channels, groups)


def _no_kernel_groups(name: str, kernel_groups: object) -> int:
    if kernel_groups is not None:
        raise ValueError(
            f"`kernel_groups` is for kernel='shared'; got kernel_groups={kernel_groups!r} with kernel={name!r}."
        )
    return 1


def _check_shared(kernel_groups: object, in_channels: int, out_channels: int, groups: int) -> int:
    g = 1 if kernel_groups is None else kernel_groups
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or in_channels % g:
        raise ValueError(
            f"Invalid value for `kernel_groups`; expected an int >= 1 dividing in_channels={in_channels}, "
            f"got kernel_groups={kernel_groups!r}."
        )
    if out_channels != in_channels:
        raise ValueError(
            "kernel='shared' filters every channel with its group's kernel, so out_channels must equal "
            f"in_channels; got in_channels={in_channels}, out_channels={out_channels}."
        )
    if groups != 1:
        raise ValueError(
            "kernel='shared' is depthwise by construction (its channel groups are `kernel_groups`); "
            f"expected groups=1, got groups={groups}."
        )
    return g


def contract(weights: Tensor, patches: Tensor, geom: ConvGeometry) -> Tensor:
    """Apply each patch's full weight to that patch: ``(B, O, Cg*K) x (B, C*K) -> (B, O)``."""
    rows, groups = patches.shape[0], geom.groups
    per_group = geom.patch_size // groups
    w = weights.reshape(rows * groups, geom.out_channels // groups, per_group)
    p = patches.reshape(rows * groups, per_group, 1)
    return torch.bmm(w, p).view(rows, geom.out_channels)


@dataclass(frozen=True)
class KernelForm:
    """One form for one call's geometry (``kernel_groups``: the kernel groups of :class:`Shared`).

    Subclasses set :attr:`NAME` and :attr:`WHAT` and implement :attr:`shapes` and :meth:`apply`.
    """

    NAME: ClassVar[str]
    WHAT: ClassVar[str]  # what the generator returns per location, for error messages
    # contracts patch rows in the "columns" layout (when the generator does not read them)
    COLUMNS: ClassVar[bool] = True
    # the layer owns a static weight (out, in / groups, *k) that the form reads
    STATIC_WEIGHT: ClassVar[bool] = False

    geom: ConvGeometry
    kernel_groups: int = 1

    @property
    def name(self) -> str:
        """The name ``kernel=`` gives the form."""
        return self.NAME

    @classmethod
    def check(cls, kernel_groups: object, in_channels: int, out_channels: int, groups: int) -> int:
        """Check the form's arguments against the convolution's; return the number of kernel groups."""
        return _no_kernel_groups(cls.NAME, kernel_groups)

    @cached_property
    def shapes(self) -> list[tuple[int, ...]]:
        """The per-row shapes the generator may return, the first the canonical one."""
        raise NotImplementedError

    @property
    def fast_path_blocker(self) -> str | None:
        """Why the fast path (which contracts full weights) cannot run this form, or ``None``."""
        return f"kernel={self.NAME!r} has its own contraction, which forms no per-location weight"

    def generated(self, out: object, given: Sequence[Tensor]) -> Tensor:
        """The generator's output for the rows it was ``given``, checked and viewed for :meth:`apply`.

        Raises:
            GeneratorOutputError: not one of :attr:`shapes` per row.

        """
        shapes, rows = self.shapes, given[0].shape[0]
        if not isinstance(out, Tensor) or tuple(out.shape[1:]) not in shapes or out.shape[0] != rows:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            expected = " or ".join(str((rows, *s)) for s in shapes)
            width = sum(t.shape[1] for t in given)
            raise GeneratorOutputError(
                f"The generator must return {self.WHAT}: expected shape "
                f"{expected} for {rows} rows of {width} features (out_channels={self.geom.out_channels}, "
                f"in_channels // groups={self.geom.in_channels // self.geom.groups}, "
                f"kernel_size={self.geom.kernel_size}), got {got}."
            )
        return out.reshape(rows, -1)

    def apply(
        self,
        generated: Tensor,
        patches: Tensor,
        weight: Tensor | None = None,
        layout: str = "rows",
        *,
        values: bool = True,
    ) -> Tensor:
        """Output rows ``(B, out)`` from the generated rows, the patch rows ``(B, C * K)`` (in ``layout``,
        :data:`chunkconv.gather.PATCH_LAYOUTS`) and the static weight.

        ``values=False`` (backward's recompute, which differentiates the graph and never reads the
        output) lets a form leave the output's values unset where computing them costs much.
        """
        raise NotImplementedError

    def weight_entries(self) -> int:
        """Entries the generator makes per location (what the plan prints)."""
        return math.prod(self.shapes[0])

    @classmethod
    def describe(cls, generated: int | None, geom: ConvGeometry) -> str:
        """What the plan prints about the kernels (``generated``: :meth:`weight_entries`)."""
        return f"{generated:,}-entry kernels each ({cls.NAME} form)"


@dataclass(frozen=True)
class Full(KernelForm):
    """A whole weight ``(out, in / groups, *k)`` per location, applied to the patch."""

    NAME: ClassVar[str] = "full"
    WHAT: ClassVar[str] = "one weight per patch"
    COLUMNS: ClassVar[bool] = False

    @cached_property
    def shapes(self) -> list[tuple[int, ...]]:
        """A whole weight per location, or the same flattened."""
        return [self.geom.weight_shape, (self.geom.weight_numel,)]

    @property
    def fast_path_blocker(self) -> str | None:
        """``None``: the fast path contracts full weights."""
        return None

    def apply(
        self,
        generated: Tensor,
        patches: Tensor,
        weight: Tensor | None = None,
        layout: str = "rows",
        *,
        values: bool = True,
    ) -> Tensor:
        """Apply each location's weight to its patch."""
        return contract(generated, patches, self.geom)

    @classmethod
    def describe(cls, generated: int | None, geom: ConvGeometry) -> str:
        """The plan's text: the size of one weight."""
        return f"weight {geom.weight_numel:,} entries each"


@dataclass(frozen=True)
class Modulated(KernelForm):
    """Per-tap scalars ``(*k)`` or ``(in, *k)`` scaling a static weight ``(out, in / groups, *k)``."""

    NAME: ClassVar[str] = "modulated"
    WHAT: ClassVar[str] = "per-tap scalars per location for kernel='modulated'"
    STATIC_WEIGHT: ClassVar[bool] = True

    @cached_property
    def shapes(self) -> list[tuple[int, ...]]:
        """Per-tap scalars, or per input channel and tap, each possibly flattened."""
        g, k = self.geom, self.geom.kernel_size
        return [tuple(k), (g.kernel_numel,), (g.in_channels, *k), (g.in_channels * g.kernel_numel,)]

    def apply(
        self,
        generated: Tensor,
        patches: Tensor,
        weight: Tensor | None = None,
        layout: str = "rows",
        *,
        values: bool = True,
    ) -> Tensor:
        """Scale the patch rows' taps, then one GEMM with the static weight."""
        assert weight is not None
        flat = weight.reshape(self.geom.out_channels, -1)
        return modulate(patches, generated, flat, self.geom.groups, layout == "columns", values=values)

    @classmethod
    def describe(cls, generated: int | None, geom: ConvGeometry) -> str:
        """The plan's text: the scalars made per location and the static weight they scale."""
        return f"{generated:,} scalars each, scaling a static weight of {geom.weight_numel:,} entries"


@dataclass(frozen=True)
class Shared(KernelForm):
    """One kernel ``(*k)`` per group of channels, ``(G, *k)``, applied depthwise (``out = in`` channels)."""

    NAME: ClassVar[str] = "shared"
    WHAT: ClassVar[str] = "one kernel per channel group per location for kernel='shared'"

    @classmethod
    def check(cls, kernel_groups: object, in_channels: int, out_channels: int, groups: int) -> int:
        """One kernel per channel group: ``kernel_groups`` divides the channels; ``out == in``, ``groups=1``."""
        return _check_shared(kernel_groups, in_channels, out_channels, groups)

    @cached_property
    def shapes(self) -> list[tuple[int, ...]]:
        """One kernel per channel group, possibly flattened."""
        k, taps = self.geom.kernel_size, self.geom.kernel_numel
        return [(self.kernel_groups, *k), (self.kernel_groups * taps,)]

    def apply(
        self,
        generated: Tensor,
        patches: Tensor,
        weight: Tensor | None = None,
        layout: str = "rows",
        *,
        values: bool = True,
    ) -> Tensor:
        """Filter every channel with its group's kernel, depthwise."""
        rows, c, taps, g = patches.shape[0], self.geom.in_channels, self.geom.kernel_numel, self.kernel_groups
        if layout == "columns":  # (G, C / G, K, B) x (G, 1, K, B), summed over the taps
            kernels = generated.t().contiguous().view(g, 1, taps, rows)
            out = _Depthwise.apply(patches.t().view(g, c // g, taps, rows), kernels, 2, 1, values)
            return out.view(c, rows).t()
        kernels = generated.reshape(rows, g, 1, taps)
        return _Depthwise.apply(patches.view(rows, g, c // g, taps), kernels, 3, 2, values).view(rows, c)

    @classmethod
    def describe(cls, generated: int | None, geom: ConvGeometry) -> str:
        """The plan's text: the depthwise kernels made per location."""
        return f"{generated:,}-entry depthwise kernels each ({cls.NAME} form)"


# Every form, by the name ``kernel=`` gives it.
FORM_CLASSES: dict[str, type[KernelForm]] = {f.NAME: f for f in (Full, Modulated, Shared)}
FORMS = tuple(FORM_CLASSES)


def make_form(name: str, geom: ConvGeometry, kernel_groups: int = 1) -> KernelForm:
    """The form ``kernel=name`` names, for one call's geometry."""
    return FORM_CLASSES[name](geom, kernel_groups)


class _Depthwise(torch.autograd.Function):
    """``(patches * kernels).sum(tap_dim)``, kernels broadcast along ``share_dim`` (the channels of a group).

    The backward is written out: ``bmm``'s for these per-location matrix-vector products is
    several times slower on the CPU (measured on a chunk of 7,282 patches of 3 channels x 11 x 11:
    5.3 against 1.6 ms), and so is autograd's for a broadcast multiply and sum. The patches'
    gradient comes out in the patches' layout, ready to be added back. Without ``values`` (backward's
    recompute) the product is not computed: it is most of a kernel-prediction layer's forward.
    """

    @staticmethod
    def forward(ctx: Any, patches: Tensor, kernels: Tensor, tap_dim: int, share_dim: int, values: bool) -> Tensor:
        ctx.save_for_backward(patches, kernels)
        ctx.dims = (tap_dim, share_dim)
        if not values:
            shape = list(torch.broadcast_shapes(patches.shape, kernels.shape))
            del shape[tap_dim]
            return patches.new_empty(shape, dtype=torch.result_type(patches, kernels))
        return (patches * kernels).sum(tap_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        patches, kernels = ctx.saved_tensors
        tap_dim, share_dim = ctx.dims
        grad = grad.unsqueeze(tap_dim)
        want_patches, want_kernels = ctx.needs_input_grad[:2]
        grad_patches = (grad * kernels).to(patches.dtype) if want_patches else None
        grad_kernels = (patches * grad).sum(share_dim, keepdim=True).to(kernels.dtype) if want_kernels else None
        return grad_patches, grad_kernels, None, None, None
