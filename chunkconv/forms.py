"""Kernel forms: what the generator returns for a location, and how it meets the patch.

* ``"full"``: a whole weight ``(out, in / groups, *k)`` per location, applied to the patch (one
  small matrix-vector product per location).
* ``"modulated"``: per-tap scalars ``(*k)`` (or per input channel and tap, ``(in, *k)``) that
  scale a learnable static weight ``(out, in / groups, *k)``, as pixel-adaptive convolution and
  DCNv2's mask do. Computed without forming per-location weights: the chunk's patch rows are
  scaled, then multiplied by the static weight in one GEMM (an ordinary unfold convolution's cost).
* ``"shared"``: one kernel ``(*k)`` per group of channels, ``(G, *k)``, applied depthwise (as
  involution, kernel prediction and spatially varying blur do): ``out = in`` channels, channel
  ``c`` filtered with the kernel of group ``c // (in / G)`` (consecutive channels share). Never
  forms an ``(out, in)`` weight.

Each form checks the generator's output (:meth:`KernelForm.generated`) and contracts it with the
chunk's patch rows (:meth:`KernelForm.apply`). Pure shape logic plus a few tensor ops per chunk.
The structured forms contract patch rows in either layout of :mod:`.gather` (the same values):
contiguous rows, or the ``"columns"`` layout, which they compute in as ``nn.Conv2d``'s im2col
path does (output rows then come back as the transpose of a contiguous ``(out, B)`` result).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .errors import GeneratorOutputError
from .gather import is_column_major
from .geometry import ConvGeometry

__all__ = ["FORMS", "KernelForm", "check_form", "contract", "static_weight_shape"]

FORMS = ("full", "modulated", "shared")


def static_weight_shape(geom: ConvGeometry) -> tuple[int, ...]:
    """The modulated form's static weight: ``nn.Conv*d``'s ``(out, in / groups, *kernel_size)``."""
    return geom.weight_shape


def check_form(kernel: object, kernel_groups: object, in_channels: int, out_channels: int, groups: int) -> int:
    """Check a form's arguments against the convolution's; return the number of kernel groups.

    Raises:
        ValueError: an unknown form, or arguments the form cannot take.

    """
    if kernel not in FORMS:
        raise ValueError(f"Invalid value for `kernel`; expected one of {FORMS}, got kernel={kernel!r}.")
    if kernel != "shared":
        if kernel_groups is not None:
            raise ValueError(
                f"`kernel_groups` is for kernel='shared'; got kernel_groups={kernel_groups!r} with {kernel=}."
            )
        return 1
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
    """One form for one call's geometry (``groups``: the kernel groups of ``"shared"``)."""

    name: str
    geom: ConvGeometry
    kernel_groups: int = 1

    @cached_property
    def shapes(self) -> list[tuple[int, ...]]:
        """The per-row shapes the generator may return, the first the canonical one."""
        g, k = self.geom, self.geom.kernel_size
        taps = g.kernel_numel
        if self.name == "full":
            return [g.weight_shape, (g.weight_numel,)]
        if self.name == "modulated":
            return [tuple(k), (taps,), (g.in_channels, *k), (g.in_channels * taps,)]
        return [(self.kernel_groups, *k), (self.kernel_groups * taps,)]

    def generated(self, out: object, given: Sequence[Tensor]) -> Tensor:
        """The generator's output for the rows it was ``given``, checked and viewed for :meth:`apply`.

        Raises:
            GeneratorOutputError: not one of :attr:`shapes` per row.

        """
        shapes, rows = self.shapes, given[0].shape[0]
        if not isinstance(out, Tensor) or tuple(out.shape[1:]) not in shapes or out.shape[0] != rows:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            what = {
                "full": "one weight per patch",
                "modulated": "per-tap scalars per location for kernel='modulated'",
                "shared": "one kernel per channel group per location for kernel='shared'",
            }
            expected = " or ".join(str((rows, *s)) for s in shapes)
            width = sum(t.shape[1] for t in given)
            raise GeneratorOutputError(
                f"The generator must return {what[self.name]}: expected shape "
                f"{expected} for {rows} rows of {width} features (out_channels={self.geom.out_channels}, "
                f"in_channels // groups={self.geom.in_channels // self.geom.groups}, "
                f"kernel_size={self.geom.kernel_size}), got {got}."
            )
        return out.reshape(rows, -1)

    def apply(self, generated: Tensor, patches: Tensor, weight: Tensor | None = None) -> Tensor:
        """Output rows ``(B, out)`` from the generated rows, the patch rows ``(B, C * K)`` and the static weight."""
        if self.name == "full":
            return contract(generated, patches, self.geom)
        columns = is_column_major(patches)
        if self.name == "modulated":
            assert weight is not None
            return _modulate(generated, patches, weight, self.geom, columns)
        rows, c, taps, g = patches.shape[0], self.geom.in_channels, self.geom.kernel_numel, self.kernel_groups
        if columns:  # (G, C / G, K, B) x (G, 1, K, B), summed over the taps
            kernels = generated.t().contiguous().view(g, 1, taps, rows)
            return _Depthwise.apply(patches.t().view(g, c // g, taps, rows), kernels, 2, 1).view(c, rows).t()
        kernels = generated.reshape(rows, g, 1, taps)
        return _Depthwise.apply(patches.view(rows, g, c // g, taps), kernels, 3, 2).view(rows, c)

    def weight_entries(self) -> int:
        """Entries the generator makes per location (what the plan prints)."""
        return math.prod(self.shapes[0])


def _modulate(generated: Tensor, patches: Tensor, weight: Tensor, geom: ConvGeometry, columns: bool) -> Tensor:
    """The modulated form: scale each patch's taps (``generated``: ``(B, K)`` or ``(B, C * K)``),
    then one matrix product with the static weight (per group).
    """
    rows, c, taps, groups, out = patches.shape[0], geom.in_channels, geom.kernel_numel, geom.groups, geom.out_channels
    per_group = geom.patch_size // groups
    if columns:  # as Conv2d's im2col path: weight (O, P) @ scaled columns (P, B)
        scale = generated.t().contiguous().view(-1, taps, rows)
        scaled = (patches.t().view(c, taps, rows) * scale).view(geom.patch_size, rows)
        if groups == 1:
            return (weight.reshape(out, -1) @ scaled).t()
        w = weight.reshape(groups, out // groups, per_group)
        return torch.bmm(w, scaled.view(groups, per_group, rows)).view(out, rows).t()
    scale = generated.view(rows, -1 if generated.shape[1] == c * taps else 1, taps)
    scaled = (patches.view(rows, c, taps) * scale).view(rows, c * taps)
    if groups == 1:
        return F.linear(scaled, weight.reshape(out, -1))
    w = weight.reshape(groups, out // groups, per_group)
    y = torch.bmm(scaled.view(rows, groups, per_group).transpose(0, 1), w.transpose(1, 2))
    return y.transpose(0, 1).reshape(rows, out)


class _Depthwise(torch.autograd.Function):
    """``(patches * kernels).sum(tap_dim)``, kernels broadcast along ``share_dim`` (the channels of a group).

    The backward is written out: ``bmm``'s for these per-location matrix-vector products is
    several times slower on the CPU (measured on a chunk of 7,282 patches of 3 channels x 11 x 11:
    5.3 against 1.6 ms), and so is autograd's for a broadcast multiply and sum. The patches'
    gradient comes out in the patches' layout, ready to be added back.
    """

    @staticmethod
    def forward(ctx, patches: Tensor, kernels: Tensor, tap_dim: int, share_dim: int) -> Tensor:
        ctx.save_for_backward(patches, kernels)
        ctx.dims = (tap_dim, share_dim)
        return (patches * kernels).sum(tap_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        patches, kernels = ctx.saved_tensors
        tap_dim, share_dim = ctx.dims
        grad = grad.unsqueeze(tap_dim)
        want_patches, want_kernels = ctx.needs_input_grad[:2]
        grad_patches = (grad * kernels).to(patches.dtype) if want_patches else None
        grad_kernels = (patches * grad).sum(share_dim, keepdim=True).to(kernels.dtype) if want_kernels else None
        return grad_patches, grad_kernels, None, None
