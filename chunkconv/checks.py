"""Every check of a call's arguments that needs more than the convolution's geometry.

One module for them (as NATTEN keeps its ``utils/checks.py``), so each rule is written once and
each message is worded once: what is wrong, what was expected, what was got. The convolution's own
arguments (``kernel_size``, ``padding``, ...) are normalised in :mod:`.geometry`. Nothing here
touches tensor data: checks look at types, shapes, dtypes, devices and module structure only.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .budget import parse_budget
from .errors import BatchCoupledGeneratorError, ShardedGeneratorError, UnsupportedError, UntrackedGradientError
from .forms import FORM_CLASSES
from .geometry import ConvGeometry
from .streams import KINDS

__all__ = [
    "AUTOCAST_DTYPES",
    "autocast_compatible",
    "PATHS",
    "SideInput",
    "batched_shape",
    "check_bias",
    "check_bool",
    "check_device",
    "check_shape",
    "check_transforms",
    "input_kinds",
    "check_budget_form",
    "check_chunk_size",
    "check_generator",
    "check_generator_callable",
    "module_effects_error",
    "needs_effects_probe",
    "check_input_dtype",
    "check_input_type",
    "check_inputs",
    "check_path",
    "check_sampling",
    "check_side_inputs",
    "check_static_weight",
]

PATHS = ("auto", "fast", "generic")

# The dtypes autocast casts to its lower precision (it leaves float64 alone).
AUTOCAST_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


def autocast_compatible(a: torch.dtype, b: torch.dtype, device: torch.device) -> bool:
    """Whether tensors of dtypes ``a`` and ``b`` can meet on ``device``: the same dtype, or both
    cast by the autocast region in force (float32/float16/bfloat16, not float64).
    """
    return a == b or (torch.is_autocast_enabled(device.type) and {a, b} <= AUTOCAST_DTYPES)


# Modules whose output for one row depends on the other rows of the same call
# when given a 2-D (B, features) tensor: chunking would change their results.
_ATTENTION_TYPES = (
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


# -- options -----------------------------------------------------------------------------------


def check_chunk_size(chunk_size: object) -> None:
    """Refuse a ``chunk_size`` that is neither ``None`` nor an int >= 1."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"Invalid value for `chunk_size`; expected an int >= 1 or None, got {chunk_size=}.")


def check_path(path: object) -> None:
    """Refuse a ``path`` that is not one of :data:`PATHS`."""
    if path not in PATHS:
        raise ValueError(f"Invalid value for `path`; expected one of {PATHS}, got {path=}.")


def check_budget_form(budget: object) -> None:
    """Refuse a malformed budget before any call.

    Only its form is checked, against the CPU: a layer may be built on ``"meta"`` (deferred init),
    whose free memory is unknown; fractions and ``"auto"`` are resolved per call.
    """
    if budget is None or (isinstance(budget, str) and budget.strip().lower() == "auto"):
        return  # resolved per call; checking it here would read the free memory (and trip torch.compile)
    if (
        isinstance(budget, numbers.Real)
        and not isinstance(budget, (bool, numbers.Integral))
        and 0.0 < float(budget) <= 1.0
    ):
        return  # a fraction: likewise
    parse_budget(budget, "cpu")  # type: ignore[arg-type]


def check_bool(name: str, value: object, *, optional: bool = False) -> None:
    """Refuse anything but ``True``/``False`` (and ``None`` where ``optional``): ``"no"`` and ``1`` are not bools."""
    if isinstance(value, bool) or (optional and value is None):
        return
    expected = "None, True or False" if optional else "True or False"
    raise ValueError(f"Invalid value for `{name}`; expected {expected}, got {name}={value!r}.")


def input_kinds(inputs: object) -> tuple[str, ...]:
    """``inputs`` as a tuple, before it is checked: a bare string is one kind (as torch takes an int for a tuple)."""
    if isinstance(inputs, str):
        return (inputs,)
    if not isinstance(inputs, Sequence):
        raise TypeError(
            f"Invalid type for `inputs`; expected a kind or a tuple of kinds from {tuple(KINDS)}, "
            f"got {type(inputs).__name__} (inputs={inputs!r})."
        )
    return tuple(inputs)


def check_shape(shape: object, what: str) -> tuple[int, ...]:
    """A shape as a tuple of ints >= 0; floats, negatives, strings and bools refused (not truncated)."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"Invalid type for the shape of {what}; expected a tuple of ints, got {shape!r}.")
    bad = [s for s in shape if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0]
    if bad:
        raise ValueError(f"Invalid shape for {what}; expected ints >= 0, got {tuple(shape)!r} ({bad[0]!r}).")
    return tuple(int(s) for s in shape)


def check_device(device: torch.device) -> None:
    """Refuse a device chunkconv cannot run on here, saying what is supported instead."""
    if device.type == "meta":
        raise ValueError(
            "Invalid device meta: chunkconv runs the generator on real data (its planner measures it), and meta "
            "tensors have none. To see a plan without allocating, pass the input's shape to chunkconv.plan "
            "(or conv.plan) with device='cpu' or a GPU; a layer built on meta must be moved (.to_empty) first."
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"Invalid device {device}: CUDA is not available here (torch.cuda.is_available() is False). "
            "Plan for device='cpu', or run where a GPU and a CUDA build of torch are."
        )
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(
            f"Invalid device {device}: chunkconv runs on the devices torch's autocast supports (cpu, cuda, and "
            f"other accelerators torch registers), got device type {device.type!r}."
        )


def check_transforms(tensors: Sequence[object], op: str) -> None:
    """Refuse torch.func transforms and forward-mode AD, which chunkconv's chunked Function does not support."""
    from torch.autograd import forward_ad

    why = (
        "chunkconv's autograd Function runs forward chunk by chunk without a graph and recomputes each chunk "
        "in backward, so it has neither a vmap rule nor a forward-mode (jvp) derivative"
    )
    fix = (
        "use chunkconv.dynamic_conv_reference (unchunked, plain autograd: every transform works) with the same "
        "generator and arguments, or ordinary reverse-mode autograd (see docs/training.md)"
    )
    if torch._C._are_functorch_transforms_active():
        raise UnsupportedError(
            f"{op} does not support torch.func transforms (vmap, grad, jacrev, jvp, ...): {why}; {fix}."
        )
    if any(isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise UnsupportedError(
            f"{op} does not support forward-mode AD (dual tensors, torch.autograd.forward_ad): {why}; {fix}."
        )


# -- the generator -----------------------------------------------------------------------------


def check_generator_callable(generator: object) -> None:
    """Refuse a generator that is neither an ``nn.Module`` nor callable."""
    if not callable(generator):
        raise TypeError(
            f"Invalid type for `generator`; expected an nn.Module or a callable, got {type(generator).__name__}."
        )


def _batch_coupled_reason(generator: object) -> str | None:
    if not isinstance(generator, nn.Module):
        return None
    for name, module in generator.named_modules():
        where = f" (at {name!r})" if name else ""
        kind = type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training:
                return f"{kind}{where} is in training mode, so it normalises with the statistics of the chunk"
            if module.running_mean is None:
                return f"{kind}{where} has track_running_stats=False, so it always uses the chunk's statistics"
        if isinstance(module, _ATTENTION_TYPES):
            return f"{kind}{where} attends across the rows of its 2-D input, i.e. across the patches of the chunk"
    return None


def _sharded_reason(generator: object) -> str | None:
    """Say where the generator is wrapped by FSDP, whose forward would fight the recomputation."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # loaded by anyone who can have wrapped it
    if fsdp is None or not isinstance(generator, nn.Module):
        return None
    kinds = tuple(getattr(fsdp, name) for name in ("FSDPModule", "FullyShardedDataParallel") if hasattr(fsdp, name))
    for name, module in generator.named_modules():
        if isinstance(module, kinds):
            where = f"the generator's submodule {name!r}" if name else "the generator"
            return f"{where} is sharded by {type(module).__name__}"
    return None


def check_generator(
    generator: Callable | nn.Module, device: torch.device, dtype: torch.dtype, allow_batch_coupled: bool
) -> dict[str, Tensor]:
    """Refuse generators that cannot work on the input; return the parameters autograd must track."""
    check_generator_callable(generator)
    if not allow_batch_coupled:
        reason = _batch_coupled_reason(generator)
        if reason is not None:
            raise BatchCoupledGeneratorError(
                f"The generator mixes patches of one call: {reason}. Its output for one patch would "
                "depend on which other patches share its chunk, so results would change with the "
                "chunk size. Put the generator in eval mode (generator.eval()), use a per-patch "
                "normalisation (LayerNorm, GroupNorm), or pass allow_batch_coupled=True to accept "
                "chunk-dependent results."
            )
    sharded = _sharded_reason(generator)
    if sharded is not None:
        raise ShardedGeneratorError(
            f"Invalid `generator`: {sharded}. FSDP gathers and frees the parameters of a module "
            "around each of its forward calls, but chunkconv calls the generator once per chunk and "
            "again per chunk in backward with its parameters swapped for stand-ins, so its gradients "
            "would be lost. Shard the DynamicConv layer (or a module containing it) instead: "
            "fully_shard(conv), not fully_shard(conv.generator)."
        )
    if not isinstance(generator, nn.Module):
        return {}
    for name, tensor in [*generator.named_parameters(), *generator.named_buffers()]:
        if tensor.device != device:
            raise ValueError(
                f"The generator's {name!r} is on {tensor.device} but the input is on {device}; "
                "expected both on the same device (move the generator with .to(device))."
            )
        if tensor.is_floating_point() and not autocast_compatible(tensor.dtype, dtype, device):
            raise ValueError(
                f"The generator's {name!r} has dtype {tensor.dtype} but the input has dtype {dtype}; "
                "expected the same dtype (convert one with .to(dtype), or run under torch.autocast, "
                "which casts float32/float16/bfloat16 but not float64)."
            )
    return dict(generator.named_parameters())


def needs_effects_probe(generator: nn.Module) -> bool:
    """Whether a module generator must be run once to see what it reads and updates.

    Modules built only from ``torch.nn``'s own layers, without hooks, read nothing but their
    registered parameters and update no buffer (norms with running statistics in training mode excepted); any
    other module (the user's own classes, parametrized layers, TorchScript and compiled modules,
    hooks such as ``spectral_norm``'s) is run once on two rows (see ``module_effects_error``).
    """
    for module in generator.modules():
        if not type(module).__module__.startswith("torch.nn.modules."):
            return True
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.training and module.track_running_stats:
            return True
        if module._forward_hooks or module._forward_pre_hooks:
            return True
    return False


def module_effects_error(
    generator: nn.Module,
    untracked: bool,
    changed: Sequence[str],
    *,
    training: bool,
    allow_batch_coupled: bool,
    op: str,
) -> Exception | None:
    """The error for what a probe run of a module generator showed (see ``measure.generator_effects``).

    ``untracked``: with its parameters replaced by detached stand-ins its output still needed a
    gradient, so it reads tensors other than its registered parameters; ``changed``: the buffers
    the run updated. ``None`` when the call can go ahead.
    """
    if training and untracked:
        compiled = sys.modules.get("torch._dynamo.eval_frame")
        if isinstance(generator, torch.jit.ScriptModule):
            why = (
                "it is a TorchScript module (torch.jit.script or torch.jit.trace), whose forward reads its "
                "parameters inside TorchScript, where chunkconv cannot substitute the stand-ins its backward "
                "differentiates. Pass the eager module instead (chunkconv calls it chunk by chunk anyway)"
            )
        elif compiled is not None and isinstance(generator, getattr(compiled, "OptimizedModule", ())):
            why = (
                "it is a torch.compile'd module, whose compiled forward reads the original module's parameters, "
                "where chunkconv cannot substitute the stand-ins its backward differentiates. Pass the original "
                "module (generator._orig_mod), and compile the model around the layer instead "
                "(see docs/training.md)"
            )
        else:
            why = (
                "it uses tensors that need a gradient but are not its registered parameters, for example layers "
                "kept in a plain Python list or a tensor it closes over. Register them: nn.ModuleList for layers, "
                "nn.Parameter (or a submodule) for tensors"
            )
        return UntrackedGradientError(
            f"Invalid `generator` for {op}: with its parameters replaced by detached stand-ins its output still "
            f"needs a gradient, so chunkconv's backward would give its parameters no gradient: {why}."
        )
    if changed and not allow_batch_coupled:
        names = ", ".join(repr(n) for n in changed)
        return BatchCoupledGeneratorError(
            f"The generator updates its state on every call: running it changed its buffers {names} "
            "(spectral_norm in training mode does this, for example). Each chunk would see other buffers than "
            "the last, so results would change with the chunk size. Put the generator in eval mode "
            "(generator.eval()), or pass allow_batch_coupled=True to accept chunk-dependent results (backward "
            "then recomputes every chunk from the buffers forward started from)."
        )
    return None


# -- side inputs and the static weight ----------------------------------------------------------

SideInput = Tensor | Sequence[int]  # a tensor, or (for plans) only its shape


def check_inputs(inputs: object) -> tuple[str, ...]:
    """Normalise ``inputs`` (what the generator receives) to a checked tuple of kinds."""
    if isinstance(inputs, str):
        inputs = (inputs,)
    names = tuple(name for name, kind in KINDS.items() if kind.selectable)
    if not isinstance(inputs, Sequence) or not inputs or any(k not in names for k in inputs):
        raise ValueError(
            f"Invalid value for `inputs`; expected a non-empty tuple of {names} (what the generator "
            f"receives, in order), got inputs={inputs!r}."
        )
    if len(set(inputs)) != len(inputs):
        raise ValueError(f"Invalid value for `inputs`; each kind at most once, got inputs={tuple(inputs)!r}.")
    return tuple(inputs)


def check_side_inputs(
    side: dict[str, SideInput],
    inputs: tuple[str, ...],
    geom: ConvGeometry,
    unbatched: bool,
    dtype: torch.dtype,
    device: torch.device,
    op: str,
) -> None:
    """Check ``features`` and ``guide`` against ``inputs`` and the call's geometry, before any work."""
    for kind in (k for k in KINDS.values() if k.side):
        name = kind.name
        given = side.get(name)
        if given is None and name in inputs:
            raise ValueError(f"inputs={inputs!r} gives the generator `{name}`, but {op} got no `{name}=` tensor.")
        if given is not None and name not in inputs:
            raise ValueError(
                f"{op} got `{name}=` but inputs={inputs!r} does not give it to the generator; "
                f"add {name!r} to `inputs` (in the order the generator takes its arguments)."
            )
        if given is None:
            continue
        output = kind.grid == "output"
        spatial = geom.out_spatial if output else geom.in_spatial
        shape = tuple(given.shape) if isinstance(given, Tensor) else check_shape(given, f"`{name}` of {op}")
        lead = () if unbatched else (geom.batch,)
        if len(shape) != len(lead) + 1 + geom.ndim or shape[len(lead) + 1 :] != spatial or shape[: len(lead)] != lead:
            expected = (*lead, name[0].upper(), *spatial)
            raise ValueError(
                f"Invalid shape for `{name}` of {op}; expected {expected} ({kind.where}: batch and spatial size "
                f"{spatial} {'of the output' if output else 'of the input'}), got {shape}."
            )
        if shape[len(lead)] < 1:
            raise ValueError(f"Invalid shape for `{name}` of {op}; expected at least one channel, got {shape}.")
        if isinstance(given, Tensor):
            if given.device != device:
                raise ValueError(
                    f"`{name}` is on {given.device} but the input is on {device}; expected the same device."
                )
            if not autocast_compatible(given.dtype, dtype, device):
                raise ValueError(
                    f"`{name}` has dtype {given.dtype} but the input has dtype {dtype}; expected the same "
                    "(or run under torch.autocast, which casts float32/float16/bfloat16)."
                )


def check_sampling(
    sampling: dict[str, SideInput],
    offset_groups: int | None,
    geom: ConvGeometry,
    unbatched: bool,
    device: torch.device,
    op: str,
) -> int | None:
    """Check a deformable call's ``offsets`` ``(N, G * K * d, *out)`` and ``mask`` ``(N, G * K, *out)``
    (torchvision's layout; without ``N`` when the input is unbatched) against the geometry and
    ``offset_groups``; return ``G`` (``None``: no offsets). ``offset_groups`` ``None`` infers ``G``.
    """
    offsets, mask = sampling.get("offsets"), sampling.get("mask")
    if offsets is None:
        if mask is not None:
            raise ValueError(f"{op} got `mask=` without `offsets=`; a mask scales the samples of a deformable call.")
        if offset_groups is not None:
            raise ValueError(
                f"{op} has offset_groups={offset_groups} (a deformable convolution) but got no `offsets=` tensor; "
                f"expected offsets of shape (N, {offset_groups} * {geom.kernel_numel} * {geom.ndim}, *out)."
            )
        return None
    if geom.padding_mode != "zeros":
        raise ValueError(
            f"Deformable sampling pads with zeros only; expected padding_mode='zeros' with `offsets=`, "
            f"got padding_mode={geom.padding_mode!r}."
        )
    k, d, out = geom.kernel_numel, geom.ndim, geom.out_spatial
    lead = () if unbatched else (geom.batch,)
    shape = tuple(offsets.shape) if isinstance(offsets, Tensor) else tuple(int(s) for s in offsets)
    per_group = k * d
    ok = len(shape) == len(lead) + 1 + d and shape[: len(lead)] == lead and shape[len(lead) + 1 :] == out
    channels = shape[len(lead)] if ok else 0
    if not ok or channels == 0 or channels % per_group:
        g = offset_groups if offset_groups is not None else "G"
        raise ValueError(
            f"Invalid shape for `offsets` of {op}; expected {(*lead, f'{g} * {per_group}', *out)} "
            f"(offset groups x K={k} taps x d={d} coordinates per output location), got {shape}."
        )
    groups = channels // per_group
    if offset_groups is not None and groups != offset_groups:
        raise ValueError(
            f"Invalid shape for `offsets` of {op}; expected {offset_groups * per_group} channels "
            f"(offset_groups={offset_groups} x K={k} x d={d}), got {shape}."
        )
    if geom.in_channels % groups:
        raise ValueError(
            f"Invalid shape for `offsets` of {op}: {groups} offset groups must divide "
            f"in_channels={geom.in_channels}; got offsets of shape {shape}."
        )
    if mask is not None:
        mshape = tuple(mask.shape) if isinstance(mask, Tensor) else tuple(int(s) for s in mask)
        if mshape != (*lead, groups * k, *out):
            raise ValueError(
                f"Invalid shape for `mask` of {op}; expected {(*lead, groups * k, *out)} "
                f"({groups} offset groups x K={k} taps per output location), got {mshape}."
            )
    for name, t in (("offsets", offsets), ("mask", mask)):
        if isinstance(t, Tensor):
            if not t.is_floating_point():
                raise TypeError(f"Expected a floating-point `{name}` for {op}, got dtype {t.dtype}.")
            if t.device != device:
                raise ValueError(f"`{name}` is on {t.device} but the input is on {device}; expected the same device.")
    return groups


def check_static_weight(
    weight: object, kernel: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> None:
    """The modulated form needs its static weight ``(out, in / groups, *k)``; the others take none."""
    if not FORM_CLASSES[kernel].STATIC_WEIGHT:
        if weight is not None:
            raise ValueError(f"`weight` is the static weight of kernel='modulated'; got one with kernel={kernel!r}.")
        return
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"kernel='modulated' needs its static weight: expected `weight` a Tensor of shape {shape}, "
            f"got {type(weight).__name__}."
        )
    if tuple(weight.shape) != shape:
        raise ValueError(
            f"Invalid shape for `weight`; expected {shape} (out, in // groups, *kernel_size), "
            f"got {tuple(weight.shape)}."
        )
    if weight.device != device:
        raise ValueError(f"`weight` is on {weight.device} but the input is on {device}; expected the same device.")
    if not autocast_compatible(weight.dtype, dtype, device):
        raise ValueError(f"`weight` has dtype {weight.dtype} but the input has dtype {dtype}; expected the same.")


# -- input and bias ----------------------------------------------------------------------------


def check_input_type(input: object, op: str) -> None:
    """Refuse an input that is not a tensor (``TypeError``), naming ``op``."""
    if not isinstance(input, Tensor):
        raise TypeError(f"Invalid type for `input` of {op}; expected a Tensor, got {type(input).__name__}.")


def check_input_dtype(dtype: torch.dtype, op: str) -> None:
    """Refuse an input dtype the convolution cannot run in (not floating point), naming ``op``."""
    if not dtype.is_floating_point:
        raise TypeError(f"Expected a floating-point input to {op}, got dtype {dtype}.")


def batched_shape(shape: Sequence[int], ndim: int, in_channels: int, op: str) -> tuple[tuple[int, ...], bool]:
    """The ``(N, C, *spatial)`` shape of an input and whether it was unbatched."""
    shape = check_shape(shape, f"the input of {op}")
    if len(shape) not in (ndim + 1, ndim + 2):
        raise ValueError(
            f"Expected {ndim + 1}-D (unbatched) or {ndim + 2}-D (batched) input to {op}, got input of shape {shape}."
        )
    unbatched = len(shape) == ndim + 1
    channels = shape[0 if unbatched else 1]
    if channels != in_channels:
        raise ValueError(
            f"Expected input with {in_channels} channels (in_channels={in_channels}), "
            f"got {channels} channels in input of shape {shape}."
        )
    return ((1, *shape) if unbatched else shape), unbatched


def check_bias(bias: object, device: torch.device, out_channels: int, dtype: torch.dtype | None = None) -> None:
    """Check the bias: a tensor ``(out_channels,)`` on the input's device, of the input's ``dtype``, or ``None``."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"Invalid type for `bias`; expected a Tensor or None, got {type(bias).__name__}.")
    if tuple(bias.shape) != (out_channels,):
        raise ValueError(
            f"Invalid shape for `bias`; expected ({out_channels},) for out_channels={out_channels}, "
            f"got {tuple(bias.shape)}."
        )
    if bias.device != device:
        raise ValueError(f"`bias` is on {bias.device} but the input is on {device}; expected the same device.")
    if dtype is not None and not autocast_compatible(bias.dtype, dtype, device):
        raise ValueError(
            f"`bias` has dtype {bias.dtype} but the input has dtype {dtype}; expected the same dtype, as F.conv*d "
            "does (convert one with .to(dtype), or run under torch.autocast)."
        )
