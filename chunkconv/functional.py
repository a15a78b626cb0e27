"""The functional API: describe the call (every check), plan, then run.

``dynamic_conv1d/2d/3d`` (and ``dynamic_conv``, which takes the number of spatial dims from
``kernel_size``) check every argument and the generator before any tensor work
(:func:`chunkconv.call.describe_call`), ask the planner for a chunking, and run it through the
autograd Function when a gradient is needed or straight through the executor when not (no saved
tensors under ``torch.no_grad``/``inference_mode``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ._compile import opaque_to_compile
from .autograd import DynamicConvFunction, ForwardContext
from .budget import parse_budget
from .call import Budget, Call, CallOptions, Generator, describe_call
from .checks import check_input_type, check_transforms, module_effects_error, needs_effects_probe
from .costs import PathChoice
from .errors import UntrackedGradientError
from .execute import ChunkStep, Executor, add_bias
from .fast import choose
from .fast.step import build_step
from .geometry import ConvSpec, conv_spec_for_input
from .measure import (
    MEASURED,
    CallKey,
    EffectsKey,
    PlanKey,
    ProbedCosts,
    StepKey,
    generator_cache,
    generator_effects,
    generator_state,
    remember,
    uses_untracked_grads,
)
from .planner import Plan, PlanRequest, make_plan
from .progress import get_progress, progress_bar, wants_progress
from .streams import SampledPatches, stream_sources

__all__ = [
    "apply_spec",
    "dynamic_conv",
    "dynamic_conv1d",
    "dynamic_conv2d",
    "dynamic_conv3d",
    "plan",
    "plan_spec",
]


def _plan(call: Call, generator: Generator, step: ChunkStep, choice: PathChoice, *, estimate: bool) -> Plan:
    """The call's :class:`Plan`, cached per generator: key, measured cost, choice."""
    geom, options, device = call.geom, call.options, call.device
    cache = generator_cache(generator)
    key = CallKey(
        in_channels=geom.in_channels,
        out_channels=geom.out_channels,
        kernel_size=geom.kernel_size,
        stride=geom.stride,
        dilation=geom.dilation,
        groups=geom.groups,
        dtype=call.dtype,
        out_dtype=call.out_dtype,
        device=device,
        autocast=torch.is_autocast_enabled(device.type),
        generator_state=generator_state(generator),
        kernel=call.form.name,
        kernel_groups=call.form.kernel_groups,
        inputs=call.options.inputs,
        channels=tuple(s.channels for s in call.streams),
        sampled=_sampled_kind(call),
    )
    step_key = StepKey(type(step).__name__, choice.path, choice.order, choice.backend)
    chunk_size = options.chunk_size
    budget_spec = repr(options.budget)
    # "auto" progress decides from the time estimate: then time a chunk even for a call
    timed = (options.progress if options.progress is not None else get_progress()) == "auto"
    grads = tuple(s.requires_grad for s in call.streams)
    plan_key = PlanKey(
        call=key,
        training=call.training,
        grads=grads,
        step=step_key,
        geom=geom,
        budget=budget_spec if chunk_size is None else None,
        chunk_size=chunk_size,
        estimate=estimate,
        timed=timed,
        unbatched=call.unbatched,
    )
    if plan_key in cache:
        return cache[plan_key]
    module = generator if isinstance(generator, nn.Module) else None
    # over several chunks the previous and the new running sum coexist with a chunk's gradient,
    # accumulated in at least float32
    tracked = [*(module.parameters() if module else ()), *step.extras]
    request = PlanRequest(
        geom,
        call.dtype,
        call.out_dtype,
        device,
        call.training,
        call.input_grad,
        path=choice,
        budget=parse_budget(options.budget, device) if chunk_size is None else None,  # fails before probing
        budget_spec=budget_spec,
        chunk_size=chunk_size,
        param_bytes=sum(p.numel() * max(4, p.element_size()) for p in tracked),
        estimate=estimate,
        streams=call.streams,
        timed=timed,
        unbatched=call.unbatched,
        kernel=call.form.name,
        generated=call.form.weight_entries(),
        inputs=call.options.inputs,
        patch_layout=step.patch_layout,
        sampling=_sampling_text(call),
    )
    costs = ProbedCosts(
        step,
        geom,
        dtype=call.dtype,
        out_dtype=call.out_dtype,
        device=device,
        training=call.training,
        cache=cache,
        key=key,
        step_key=step_key,
        streams=call.streams,
    )
    plan = make_plan(request, costs)
    if plan.cost is not None and plan.cost.method != MEASURED:  # a fallback bound: measure again next time
        return plan
    return remember(cache, plan_key, plan)


def _sampled_kind(call: Call) -> SampledPatches | None:
    """A deformable call's first stream kind (offset groups, mask, rule, grads), for the cache keys."""
    kind = call.streams[0].kind if call.streams else None
    return kind if isinstance(kind, SampledPatches) else None


def _sampling_text(call: Call) -> str:
    """What the plan prints about a deformable call's offsets stream ("" for none)."""
    kind = _sampled_kind(call)
    if kind is None:
        return ""
    geom = call.geom
    per_location = kind.per_location_bytes(geom, call.dtype.itemsize)
    what = "offsets and mask" if kind.masked else "offsets"
    return (
        f"{what} of {kind.groups} offset group{'s' * (kind.groups > 1)} x {geom.kernel_numel} taps streamed, "
        f"{per_location:,} B/location ({per_location * geom.num_patches:,} B in all, read per chunk); "
        f"{kind.rule} gradient rule"
    )


def _fast_path_blocker(call: Call) -> str | None:
    """Why the call's own options rule the fast path out, if they do."""
    if call.form.fast_path_blocker is not None:
        return call.form.fast_path_blocker
    if len(call.generator_inputs) > 1:
        return f"the generator takes {len(call.generator_inputs)} inputs ({', '.join(call.options.inputs)})"
    return None


def _prepare(call: Call, generator: Generator, weight: Tensor | None, *, estimate: bool) -> tuple[ChunkStep, Plan]:
    """The step that runs the call's path, and its plan."""
    choice, tail = choose(
        generator, call.geom, call.out_dtype, call.options.path, device=call.device, blocker=_fast_path_blocker(call)
    )
    step = build_step(
        generator,
        tuple(call.params),
        choice,
        call.geom,
        form=call.form,
        inputs=call.generator_inputs,
        static=weight,
        tail=tail,
    )
    if call.training and not isinstance(generator, nn.Module):
        _check_tracked_grads(call, step)
    elif isinstance(generator, nn.Module) and needs_effects_probe(generator):
        _check_module_effects(call, generator, step)
    return step, _plan(call, generator, step, choice, estimate=estimate)


def _check_tracked_grads(call: Call, step: ChunkStep) -> None:
    """Refuse a plain callable that uses tensors needing grad (it can own no parameters).

    Its captures are invisible, so it is checked on every training call (one run on two rows);
    a module is checked by :func:`_check_module_effects`, once per state.
    """
    untracked = uses_untracked_grads(step, call.geom, call.dtype, call.device, call.streams)
    if untracked:
        raise UntrackedGradientError(
            f"Invalid `generator` for {call.op}: the generator is a plain callable whose output needs a "
            "gradient although its input does not, so it uses tensors chunkconv cannot see "
            "(for example the parameters of a module that a function or lambda closes over). They would get "
            "no gradient. Make them the generator's parameters: pass the module itself as the generator, or "
            "wrap the function in an nn.Module that owns them."
        )


def _check_module_effects(call: Call, generator: nn.Module, step: ChunkStep) -> None:
    """Refuse a module whose output needs gradients its parameters cannot carry (TorchScript, compiled,
    layers in a plain list) or whose forward updates its buffers (spectral_norm in training mode).

    One run on two rows, once per generator state and call configuration (the result is cached).
    """
    geom = call.geom
    key = EffectsKey(
        in_channels=geom.in_channels,
        out_channels=geom.out_channels,
        kernel_size=geom.kernel_size,
        dilation=geom.dilation,
        groups=geom.groups,
        dtype=call.dtype,
        device=call.device,
        generator_state=generator_state(generator),
        kernel=call.form.name,
        inputs=call.options.inputs,
        channels=tuple(s.channels for s in call.streams),
        step=type(step).__name__,
        training=call.training,
        allow_batch_coupled=call.options.allow_batch_coupled,
        sampled=_sampled_kind(call),
    )
    cache = generator_cache(generator)
    if key in cache:
        return
    untracked, changed = generator_effects(step, geom, call.dtype, call.device, call.streams)
    error = module_effects_error(
        generator,
        untracked,
        changed,
        training=call.training,
        allow_batch_coupled=call.options.allow_batch_coupled,
        op=call.op,
    )
    if error is not None:
        raise error
    remember(cache, key, True)


def _side(features: object, guide: object) -> dict:
    return {k: v for k, v in (("features", features), ("guide", guide)) if v is not None}


def _sampling(offsets: object, mask: object, op: str) -> dict:
    found = {k: v for k, v in (("offsets", offsets), ("mask", mask)) if v is not None}
    for name, tensor in found.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"Invalid type for `{name}` of {op}; expected a Tensor, got {type(tensor).__name__}.")
    return found


def _canonical(call: Call, sampling: dict[str, Tensor], batch: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """The offsets ``(N, G, K, d, *out)`` and mask ``(N, G, K, *out)`` the sampled patches read (views)."""
    kind = call.streams[0].kind
    if not isinstance(kind, SampledPatches):
        return {}
    geom = call.geom
    n, g, k, out = geom.batch, kind.groups, geom.kernel_numel, geom.out_spatial
    found = {"offsets": batch(sampling["offsets"]).reshape(n, g, k, geom.ndim, *out)}
    if kind.masked:
        found["mask"] = batch(sampling["mask"]).reshape(n, g, k, *out)
    return found


@opaque_to_compile
def apply_spec(
    input: Tensor,
    generator: Generator,
    spec: ConvSpec,
    bias: Tensor | None = None,
    options: CallOptions | None = None,
    *,
    op: str = "dynamic_conv",
    features: Tensor | None = None,
    guide: Tensor | None = None,
    weight: Tensor | None = None,
    offsets: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Run a checked :class:`ConvSpec` (the shared body of the functions and the modules)."""
    check_input_type(input, op)
    side = _side(features, guide)
    sampling = _sampling(offsets, mask, op)
    check_transforms((input, *side.values(), *sampling.values(), bias, weight), op)
    for name, tensor in side.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"Invalid type for `{name}` of {op}; expected a Tensor, got {type(tensor).__name__}.")
    call = describe_call(
        op,
        input.shape,
        input.dtype,
        input.device,
        generator,
        spec,
        bias,
        options or CallOptions(),
        training=None,
        input_grad=input.requires_grad,
        side=side,
        weight=weight,
        sampling=sampling,
    )
    step, plan = _prepare(call, generator, weight, estimate=False)
    batch: Callable[[Tensor], Tensor] = (lambda t: t.unsqueeze(0)) if call.unbatched else (lambda t: t)
    batched = {k: batch(t) for k, t in side.items()} | _canonical(call, sampling, batch)
    sources = stream_sources(call.streams, batch(input), batched)
    geom = call.geom
    seconds = plan.estimated_seconds
    show = wants_progress(call.options.progress, seconds and seconds[0] + (seconds[1] or 0.0))
    if plan.training:
        run = ForwardContext(step, geom, plan.chunk_size, call.out_dtype, call.streams, show)
        y = DynamicConvFunction.apply(run, bias, *sources, *call.params.values(), *step.extras)
    else:
        # nothing to differentiate: record no graph, whatever the generator captures
        executor = Executor(step, geom, call.streams, call.out_dtype)
        with torch.no_grad(), progress_bar(show, geom.num_patches, "chunkconv forward") as tick:
            y, _ = executor.forward(sources, plan.chunk_size, progress=tick)
        add_bias(y, bias)
    return y.squeeze(0) if call.unbatched else y


def plan_spec(
    input: Tensor | Sequence[int],
    generator: Generator,
    spec: ConvSpec,
    bias: Tensor | None = None,
    options: CallOptions | None = None,
    *,
    training: bool | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    op: str = "plan",
    features: Tensor | Sequence[int] | None = None,
    guide: Tensor | Sequence[int] | None = None,
    weight: Tensor | None = None,
    offsets: Tensor | Sequence[int] | None = None,
    mask: Tensor | Sequence[int] | None = None,
) -> Plan:
    """The :class:`Plan` a call on ``input`` (a tensor, or just its shape) would run."""
    if isinstance(input, Tensor):
        shape, dtype, dev, input_grad = tuple(input.shape), input.dtype, input.device, input.requires_grad
    else:
        reference = next(iter(generator.parameters()), None) if isinstance(generator, nn.Module) else None
        dtype = dtype or (reference.dtype if reference is not None else torch.get_default_dtype())
        fallback = reference.device if reference is not None else torch.device("cpu")
        dev = torch.device(device) if device is not None else fallback
        shape, input_grad = tuple(input), True
    options = options or CallOptions()
    call = describe_call(
        op,
        shape,
        dtype,
        dev,
        generator,
        spec,
        bias,
        options,
        training=training,
        input_grad=input_grad,
        side=_side(features, guide),
        weight=weight,
        sampling={k: v for k, v in (("offsets", offsets), ("mask", mask)) if v is not None},
    )
    return _prepare(call, generator, weight, estimate=True)[1]


_FUNCTIONAL_DOC = """Dynamic {what}: every output location uses the weight ``generator`` makes from its patch.

    Args:
        input: ``(N, C_in, {dims})`` or unbatched ``(C_in, {dims})``.
        generator: ``nn.Module`` or callable mapping patches ``(B, C_in * prod(kernel_size))``
            (rows in ``F.unfold`` order) to weights ``(B, out_channels, C_in // groups,
            *kernel_size)`` or the same flattened.
        out_channels: channels of the output.
        kernel_size: an int or a tuple, as for ``F.conv{n}``.{ndim_note}
        stride: as for ``F.conv{n}``. Default: ``1``.
        padding: as for ``F.conv{n}``, including ``"same"`` and ``"valid"``. Default: ``0``.
        dilation: as for ``F.conv{n}``. Default: ``1``.
        groups: as for ``F.conv{n}``. Default: ``1``.
        bias: optional ``(out_channels,)`` tensor. Default: ``None``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``, as for
            ``nn.Conv{n}``. Default: ``"zeros"``.
        budget: memory budget of the call: ``"4GB"``, ``"512MiB"``, bytes, a fraction of free
            memory, or ``"auto"``. Default: ``"auto"``.
        chunk_size: patches per chunk, overriding the budget. Default: ``None``.
        allow_batch_coupled: accept generators whose rows interact (chunk-dependent results).
            Default: ``False``.
        path: ``"auto"`` (the fast path where the generator ends in ``nn.Linear``, see
            ``docs/fast-path.md``), ``"fast"`` (raise if it does not qualify) or ``"generic"``.
            Default: ``"auto"``.
        kernel: what the generator returns per location: ``"full"`` (a whole weight),
            ``"modulated"`` (per-tap scalars ``(*kernel_size)`` or ``(C_in, *kernel_size)``
            scaling the static ``weight``) or ``"shared"`` (one kernel per channel group,
            ``(kernel_groups, *kernel_size)``, applied depthwise; ``out_channels == C_in``).
            See ``docs/generator-contract.md``. Default: ``"full"``.
        weight: the static weight ``(out_channels, C_in // groups, *kernel_size)`` of
            ``kernel="modulated"``. Default: ``None``.
        kernel_groups: channel groups of ``kernel="shared"`` (consecutive channels share a
            kernel). Default: ``None`` (1).
        inputs: what the generator receives, positionally in this order: ``"patches"``,
            ``"features"`` (rows of ``features``), ``"guide"`` (patches of ``guide``),
            ``"positions"`` (each location's window centre in the input, in ``[-1, 1]`` as
            ``grid_sample`` with ``align_corners=False``, in tensor dimension order).
            Default: ``("patches",)``.
        features: per-location features ``(N, F, *out)``, not convolved; gradients flow into
            them. Default: ``None``.
        guide: a guide ``(N, G, {dims})`` windowed like the input; gradients flow into it.
            Default: ``None``.
        progress: show progress over the chunks (tqdm when installed); ``None`` follows
            ``chunkconv.set_progress``. Default: ``None``.
        offsets: a deformable convolution's offsets ``(N, G * K * d, *out)``, ``K =
            prod(kernel_size)``, read as ``(N, G, K, d, *out)``: taps in ``F.unfold``'s order,
            coordinates slowest spatial dim first (torchvision's layout). Tap ``t`` of location
            ``o`` is sampled at ``o * stride - padding + tap_t * dilation + offset``
            (multilinear, zero outside); the kernel form and a generator taking ``"patches"``
            then see the sampled patches; gradients flow into the offsets. Offset group ``g``
            covers input channels ``[g * C / G, (g + 1) * C / G)``. Zero padding only.
            Default: ``None``.
        mask: with ``offsets``, ``(N, G * K, *out)`` scaling each sample (DCNv2's modulation);
            gradients flow into it. Default: ``None``.
        offset_groups: ``G``, checked against ``offsets`` (``None``: read off its shape).
            Default: ``None``.
        sampling_rule: the offsets' gradient rule, ``"torchvision"`` (torchvision's exactly) or
            ``"strict"`` (DCNv3/DCNv4: zero gradient where the sample is invalid). Default:
            ``"torchvision"``.

    Returns:
        ``(N, out_channels, *out)`` (unbatched in, unbatched out), with torch's output size
        ``out = floor((in + pad_left + pad_right - dilation * (k - 1) - 1) / stride) + 1``.

    Raises:
        ValueError, TypeError: bad arguments or input, before any work.
        BudgetTooSmallError: not even one patch per chunk fits ``budget``.
        GeneratorOutputError: the generator's output is not what ``kernel`` takes per location.
        BatchCoupledGeneratorError: the generator mixes patches (e.g. BatchNorm in training mode).
"""


def _functional(ndim: int | None, op: str) -> Callable[..., Tensor]:
    def conv(
        input: Tensor,
        generator: Generator,
        out_channels: int,
        kernel_size: int | Sequence[int],
        bias: Tensor | None = None,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        *,
        padding_mode: str = "zeros",
        budget: Budget = "auto",
        chunk_size: int | None = None,
        allow_batch_coupled: bool = False,
        path: str = "auto",
        kernel: str = "full",
        weight: Tensor | None = None,
        kernel_groups: int | None = None,
        inputs: Sequence[str] = ("patches",),
        features: Tensor | None = None,
        guide: Tensor | None = None,
        progress: bool | None = None,
        offsets: Tensor | None = None,
        mask: Tensor | None = None,
        offset_groups: int | None = None,
        sampling_rule: str = "torchvision",
    ) -> Tensor:
        check_input_type(input, op)
        spec = conv_spec_for_input(
            input.shape, ndim, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, op
        )
        options = CallOptions.from_arguments(locals())
        return apply_spec(
            input,
            generator,
            spec,
            bias,
            options,
            op=op,
            features=features,
            guide=guide,
            weight=weight,
            offsets=offsets,
            mask=mask,
        )

    conv.__name__ = conv.__qualname__ = op
    dims = {1: "L", 2: "H, W", 3: "D, H, W", None: "*spatial"}[ndim]
    conv.__doc__ = _FUNCTIONAL_DOC.format(
        what=f"{ndim}-D convolution" if ndim else "convolution",
        dims=dims,
        n=f"{ndim}d" if ndim else "*d",
        ndim_note="" if ndim else " The number of spatial dims is ``len(kernel_size)`` (an int means 2-D).",
    )
    return conv


dynamic_conv = _functional(None, "dynamic_conv")
dynamic_conv1d = _functional(1, "dynamic_conv1d")
dynamic_conv2d = _functional(2, "dynamic_conv2d")
dynamic_conv3d = _functional(3, "dynamic_conv3d")


def plan(
    input: Tensor | Sequence[int],
    generator: Generator,
    out_channels: int,
    kernel_size: int | Sequence[int],
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    padding_mode: str = "zeros",
    budget: Budget = "auto",
    chunk_size: int | None = None,
    allow_batch_coupled: bool = False,
    path: str = "auto",
    kernel: str = "full",
    weight: Tensor | None = None,
    kernel_groups: int | None = None,
    inputs: Sequence[str] = ("patches",),
    features: Tensor | Sequence[int] | None = None,
    guide: Tensor | Sequence[int] | None = None,
    training: bool | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    offsets: Tensor | Sequence[int] | None = None,
    mask: Tensor | Sequence[int] | None = None,
    offset_groups: int | None = None,
    sampling_rule: str = "torchvision",
) -> Plan:
    """What ``dynamic_conv`` would do on ``input`` and what it would cost, without running it.

    Takes the arguments of ``dynamic_conv``; ``input``, ``features``, ``guide``, ``offsets``
    and ``mask`` may be tensors or just their shapes.
    The generator is run on a few small probe batches to measure its memory (cached).

    Args:
        training: plan for forward and backward (``True``) or forward only. Default: whether
            grad mode is on and anything (the input, for a shape always assumed) needs a gradient.
        dtype: the input's dtype when ``input`` is a shape. Default: the generator's parameters'
            (else float32).
        device: the input's device when ``input`` is a shape. Default: the generator's
            parameters' (else the CPU).

    Returns:
        A frozen ``Plan``; ``print(plan)`` shows the table.

    Raises:
        BudgetTooSmallError: with the smallest budget that fits.

    Examples:
        >>> import torch, chunkconv
        >>> gen = torch.nn.Sequential(torch.nn.Linear(36, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4 * 36))
        >>> p = chunkconv.plan((2, 4, 64, 64), gen, 4, 3, padding=1, budget="64MB")
        >>> p.num_chunks >= 1 and p.forward_peak <= p.budget
        True

    """
    shape = input.shape if isinstance(input, Tensor) else tuple(input)
    spec = conv_spec_for_input(
        shape, None, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, "plan"
    )
    return plan_spec(
        input,
        generator,
        spec,
        bias,
        CallOptions.from_arguments(locals()),
        training=training,
        dtype=dtype,
        device=device,
        features=features,
        guide=guide,
        weight=weight,
        offsets=offsets,
        mask=mask,
    )
