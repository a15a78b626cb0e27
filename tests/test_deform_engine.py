"""Deformable calls of the engine (``offsets=``, ``mask=``) against the float64 oracle.

Every kernel form with every side input, 1-3 D, any geometry, chunk sizes from one location to
all of them, both gradient rules, with and without a mask: the output and every gradient (input,
offsets, mask, side inputs, generator, static weight, bias) equal
:func:`chunkconv.dynamic_conv_reference` with the same offsets, whose patches come from
:func:`chunkconv.deform_reference.deform_sample_reference`. Also: the generator receives the
sampled patches; wrong shapes and other padding modes are refused before any work; the plan
counts and prints the offsets stream; measured peaks stay within random budgets.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import chunkconv
from chunkconv import MemoryTracker
from chunkconv.deform_reference import deform_sample_reference
from chunkconv.geometry import conv_spec
from chunkconv.testing import Concat, conv_cases, mlp_generator

F64 = torch.float64


@st.composite
def deform_cases(draw):
    case = draw(conv_cases(ndims=(1, 2, 3), allow_empty=False, max_batch=2), label="case")
    spec = dataclasses.replace(case.spec, padding_mode="zeros")  # zeros only (its sizes fit every mode's)
    kwargs = dict(case.kwargs, padding_mode="zeros")
    kernel = draw(st.sampled_from(["full", "modulated", "shared"]), label="kernel")
    kernel_groups = None
    if kernel == "shared":
        kwargs.update(out_channels=spec.in_channels, groups=1)
        spec = conv_spec(spec.ndim, in_channels=spec.in_channels, **kwargs)
        kernel_groups = draw(st.sampled_from([g for g in (1, 2) if spec.in_channels % g == 0]), label="kernel_groups")
    offset_groups = draw(st.sampled_from([g for g in (1, 2, 4) if spec.in_channels % g == 0]), label="offset_groups")
    kinds = draw(st.lists(st.sampled_from(["patches", "features", "guide", "positions"]), min_size=1, max_size=3,
                          unique=True), label="inputs")  # fmt: skip
    masked = draw(st.booleans(), label="mask")
    rule = draw(st.sampled_from(["torchvision", "strict"]), label="rule")
    scale = draw(st.sampled_from([0.0, 0.7, 2.5]), label="offset scale")
    integer = draw(st.booleans(), label="integer offsets")  # exactly on grid points: the one-sided derivative
    return case, spec, kwargs, kernel, kernel_groups, offset_groups, tuple(kinds), masked, rule, scale, integer


def _tensors(case, spec, kinds, offset_groups, masked, scale, integer):
    shape = case.input_shape
    unbatched = len(shape) == spec.ndim + 1
    batched = shape if not unbatched else (1, *shape)
    geom = spec.geometry(batched)
    lead = () if unbatched else (batched[0],)
    k, d, out = geom.kernel_numel, geom.ndim, geom.out_spatial
    offsets = torch.randn(*lead, offset_groups * k * d, *out, dtype=F64) * scale
    if integer:
        offsets = offsets.round()
    offsets.requires_grad_()
    sampling = {"offsets": offsets}
    if masked:
        sampling["mask"] = torch.rand(*lead, offset_groups * k, *out, dtype=F64, requires_grad=True)
    side, widths = {}, {"patches": geom.patch_size, "positions": spec.ndim}
    if "features" in kinds:
        side["features"] = torch.randn(*lead, 2, *out, dtype=F64, requires_grad=True)
        widths["features"] = 2
    if "guide" in kinds:
        side["guide"] = torch.randn(*lead, 1, *geom.in_spatial, dtype=F64, requires_grad=True)
        widths["guide"] = k
    return geom, sampling, side, widths


def _generated(kernel, geom, kernel_groups):
    return {
        "full": geom.weight_numel,
        "modulated": geom.kernel_numel,
        "shared": (kernel_groups or 1) * geom.kernel_numel,
    }[kernel]


@given(cases=deform_cases())
def test_every_form_and_side_input_with_offsets_matches_the_oracle(cases):
    case, spec, kwargs, kernel, kernel_groups, og, kinds, masked, rule, scale, integer = cases
    geom, sampling, side, widths = _tensors(case, spec, kinds, og, masked, scale, integer)
    gen = Concat(sum(widths[k] for k in kinds), _generated(kernel, geom, kernel_groups)).double()
    conv = chunkconv.DynamicConv(
        gen, spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride, padding=spec.padding,
        dilation=spec.dilation, groups=spec.groups, bias=case.bias, dtype=F64, chunk_size=case.chunk_size,
        kernel=kernel, kernel_groups=kernel_groups, inputs=kinds, offset_groups=og, sampling_rule=rule,
    )  # fmt: skip
    x = torch.randn(case.input_shape, dtype=F64, requires_grad=True)
    y = conv(x, **side, **sampling)
    ref = chunkconv.dynamic_conv_reference(
        x, gen, **kwargs, bias=conv.bias, kernel=kernel, weight=conv.weight, kernel_groups=kernel_groups,
        inputs=kinds, **side, **sampling, sampling_rule=rule,
    )  # fmt: skip
    context = f"{case} {kernel=} {kernel_groups=} {og=} {kinds=} {masked=} {rule=} {scale=} {integer=}"
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-11, msg=lambda m: f"output: {m}\n{context}")
    leaves = [x, *sampling.values(), *side.values(), *conv.parameters()]
    names = ["input", *sampling, *side, *(n for n, _ in conv.named_parameters())]
    upstream = torch.randn_like(ref)
    got = torch.autograd.grad(y, leaves, upstream, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, upstream, allow_unused=True)
    for name, g, w, leaf in zip(names, got, want, leaves):
        g = torch.zeros_like(leaf) if g is None else g
        w = torch.zeros_like(leaf) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}\n{context}")


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("chunk_size", [1, 13, 10_000])
def test_a_linear_generator_on_either_path_matches_the_oracle(path, chunk_size):
    spec = conv_spec(2, in_channels=4, out_channels=3, kernel_size=3, padding=1, stride=(1, 2))
    gen = mlp_generator(spec, hidden=5)
    x = torch.randn(2, 4, 6, 9, dtype=F64, requires_grad=True)
    offsets = (torch.randn(2, 2 * 9 * 2, 6, 5, dtype=F64) * 1.5).requires_grad_()
    mask = torch.rand(2, 2 * 9, 6, 5, dtype=F64, requires_grad=True)
    kw = dict(stride=(1, 2), padding=1, offsets=offsets, mask=mask)
    y = chunkconv.dynamic_conv2d(x, gen, 3, 3, chunk_size=chunk_size, path=path, **kw)
    ref = chunkconv.dynamic_conv_reference(x, gen, out_channels=3, kernel_size=3, **kw)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-11)
    leaves = [x, offsets, mask, *gen.parameters()]
    up = torch.randn_like(y)
    for g, w in zip(torch.autograd.grad(y, leaves, up), torch.autograd.grad(ref, leaves, up)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_zero_offsets_are_the_plain_dynamic_convolution():
    spec = conv_spec(2, in_channels=2, out_channels=3, kernel_size=(3, 2), padding=(1, 0), dilation=(2, 1))
    gen = mlp_generator(spec, hidden=4)
    x = torch.randn(2, 2, 7, 6, dtype=F64)
    kw = dict(padding=(1, 0), dilation=(2, 1), chunk_size=5)
    plain = chunkconv.dynamic_conv2d(x, gen, 3, (3, 2), **kw)
    zeros = torch.zeros(2, 2 * 6 * 2, 5, 5, dtype=F64)
    torch.testing.assert_close(chunkconv.dynamic_conv2d(x, gen, 3, (3, 2), offsets=zeros, **kw), plain)


def test_the_generator_receives_the_sampled_patches():
    seen = []

    class Recorder(nn.Module):
        def forward(self, rows):
            seen.append(rows.detach().clone())
            return rows.new_ones(rows.shape[0], 9)

    x = torch.randn(1, 2, 5, 5, dtype=F64)
    offsets = torch.randn(1, 9 * 2, 5, 5, dtype=F64) * 1.3
    mask = torch.rand(1, 9, 5, 5, dtype=F64)
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    with torch.no_grad():
        chunkconv.dynamic_conv2d(x, Recorder(), 3, 3, padding=1, kernel="modulated", weight=w, offsets=offsets,
                                 mask=mask, chunk_size=7)  # fmt: skip
    rows = torch.cat(seen[-4:])  # the call's 4 chunks (25 locations), after the planner's probes
    want = deform_sample_reference(x, offsets.view(1, 1, 9, 2, 5, 5), mask.view(1, 1, 9, 5, 5), kernel_size=3,
                                   padding=1)  # fmt: skip
    torch.testing.assert_close(rows, want.view(18, 25).t())


def test_unbatched_input_takes_unbatched_offsets():
    spec = conv_spec(1, in_channels=2, out_channels=2, kernel_size=3, padding=1)
    gen = mlp_generator(spec, hidden=3)
    x = torch.randn(2, 8, dtype=F64)
    offsets = torch.randn(3, 8, dtype=F64)
    mask = torch.rand(3, 8, dtype=F64)
    y = chunkconv.dynamic_conv1d(x, gen, 2, 3, padding=1, offsets=offsets, mask=mask, chunk_size=3)
    want = chunkconv.dynamic_conv1d(x[None], gen, 2, 3, padding=1, offsets=offsets[None], mask=mask[None])
    torch.testing.assert_close(y, want[0])


def test_a_layer_built_with_offset_groups_checks_them():
    spec = conv_spec(2, in_channels=4, out_channels=2, kernel_size=3, padding=1)
    conv = chunkconv.DynamicConv2d(mlp_generator(spec, hidden=3), 4, 2, 3, padding=1, offset_groups=2, dtype=F64)
    assert "offset_groups=2" in repr(conv)
    x = torch.randn(1, 4, 5, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"offset_groups=2 .* but got no `offsets=`"):
        conv(x)
    with pytest.raises(ValueError, match=r"expected 36 channels \(offset_groups=2"):
        conv(x, offsets=torch.zeros(1, 18, 5, 5, dtype=F64))
    assert conv(x, offsets=torch.zeros(1, 36, 5, 5, dtype=F64)).shape == (1, 2, 5, 5)
    plain = chunkconv.DynamicConv2d(mlp_generator(spec, hidden=3), 4, 2, 3, padding=1, dtype=F64)
    with pytest.raises(ValueError, match=r"got `offsets=` but was built without offset_groups"):
        plain(x, offsets=torch.zeros(1, 36, 5, 5, dtype=F64))


@pytest.mark.parametrize(
    ("offsets", "mask", "match"),
    [
        ((1, 17, 5, 5), None, r"^Invalid shape for `offsets` of dynamic_conv2d; expected \(1, 'G \* 18', 5, 5\)"),
        ((1, 18, 5, 4), None, r"^Invalid shape for `offsets`"),
        ((2, 18, 5, 5), None, r"^Invalid shape for `offsets`"),
        ((1, 54, 5, 5), None, r"3 offset groups must divide in_channels=4"),
        ((1, 36, 5, 5), (1, 9, 5, 5), r"^Invalid shape for `mask` of dynamic_conv2d; expected \(1, 18, 5, 5\)"),
        (None, (1, 9, 5, 5), r"got `mask=` without `offsets=`"),
    ],
)
def test_wrong_shapes_are_refused_before_any_work(offsets, mask, match):
    calls = []

    def gen(rows):
        calls.append(rows)
        return rows.new_zeros(rows.shape[0], 2 * 36)

    x = torch.randn(1, 4, 5, 5, dtype=F64)
    kw = {}
    if offsets is not None:
        kw["offsets"] = torch.zeros(offsets, dtype=F64)
    if mask is not None:
        kw["mask"] = torch.ones(mask, dtype=F64)
    with pytest.raises(ValueError, match=match):
        chunkconv.dynamic_conv2d(x, gen, 2, 3, padding=1, **kw)
    assert not calls


def test_other_padding_modes_and_integer_offsets_are_refused():
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    gen = mlp_generator(conv_spec(2, in_channels=2, out_channels=2, kernel_size=3, padding=1), hidden=3)
    with pytest.raises(
        ValueError, match=r"zeros only; expected padding_mode='zeros' with `offsets=`, got padding_mode='reflect'"
    ):
        chunkconv.dynamic_conv2d(x, gen, 2, 3, padding=1, padding_mode="reflect", offsets=torch.zeros(1, 18, 5, 5))
    with pytest.raises(ValueError, match=r"zeros only; expected padding_mode='zeros' with offset_groups"):
        chunkconv.DynamicConv2d(gen, 2, 2, 3, padding=1, padding_mode="circular", offset_groups=1)
    with pytest.raises(TypeError, match=r"floating-point `offsets`"):
        chunkconv.dynamic_conv2d(x, gen, 2, 3, padding=1, offsets=torch.zeros(1, 18, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^Invalid value for `inputs`"):
        chunkconv.DynamicConv2d(gen, 2, 2, 3, inputs=("sampled patches",))
    with pytest.raises(ValueError, match=r"^Invalid value for `rule`"):
        chunkconv.DynamicConv2d(gen, 2, 2, 3, offset_groups=1, sampling_rule="mmcv")


def test_the_plan_counts_and_prints_the_offsets_stream():
    spec = conv_spec(2, in_channels=4, out_channels=4, kernel_size=3, padding=1)
    conv = chunkconv.DynamicConv2d(mlp_generator(spec, hidden=4, dtype=torch.float32), 4, 4, 3, padding=1,
                                   offset_groups=2, budget="64MB")  # fmt: skip
    shape = (2, 4, 32, 32)
    plan = conv.plan(shape, offsets=(2, 36, 32, 32), mask=(2, 18, 32, 32), training=True)
    text = str(plan)
    assert "sampled  offsets and mask of 2 offset groups x 9 taps streamed, 216 B/location" in text
    assert plan.fixed_backward["offsets gradient"] == 2 * 32 * 32 * 2 * 9 * 2 * 4
    assert plan.fixed_backward["mask gradient"] == 2 * 32 * 32 * 2 * 9 * 4
    assert plan.fixed_forward["input, channels-last rows"] == (2 * 4 * 32 * 32 + 2) * 4
    assert "padded input" not in plan.fixed_forward
    inference = conv.plan(shape, offsets=(2, 36, 32, 32), training=False)
    assert "sampled  offsets of 2 offset groups" in str(inference) and "rule" in str(inference)


@given(data=st.data(), factor=st.floats(1.0, 3.0), training=st.booleans())
def test_random_budgets_hold_as_measured(data, factor, training):
    kernel = data.draw(st.sampled_from(["full", "modulated", "shared"]), label="kernel")
    c = data.draw(st.sampled_from([2, 4]), label="channels")
    og = data.draw(st.sampled_from([1, 2]), label="offset groups")
    size = data.draw(st.integers(6, 20), label="size")
    masked = data.draw(st.booleans(), label="mask")
    spec = conv_spec(2, in_channels=c, out_channels=c, kernel_size=3, padding=1)
    out = {"full": spec.out_channels * c * 9, "modulated": 9, "shared": 9}[kernel]
    gen = nn.Sequential(nn.Linear(c * 9, 6), nn.Tanh(), nn.Linear(6, out)).double()
    x = torch.randn(2, c, size, size, dtype=F64, requires_grad=training)
    side = {"offsets": (torch.randn(2, og * 18, size, size, dtype=F64) * 2).requires_grad_(training)}
    if masked:
        side["mask"] = torch.rand(2, og * 9, size, size, dtype=F64, requires_grad=training)
    args = dict(padding=1, kernel=kernel, offset_groups=og, dtype=F64)
    probe = chunkconv.DynamicConv2d(gen, c, c, 3, budget=2**40, **args)
    minimum = probe.plan(x, training=training, **side).minimum_budget
    budget = int(minimum * factor)
    conv = chunkconv.DynamicConv2d(gen, c, c, 3, budget=budget, **args)
    for call in ("first", "repeat"):
        with torch.set_grad_enabled(training), MemoryTracker() as fwd:
            y = conv(x, **side)
        assert fwd.peak <= budget, (call, "forward", fwd.peak / budget, conv.plan(x, training=training, **side))
        if training:
            with MemoryTracker() as bwd:
                y.backward(torch.randn_like(y))
            assert bwd.peak <= budget, (call, "backward", bwd.peak / budget, conv.plan(x, training=training, **side))
        del y


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_first_backward_holds_the_budget_gradients_in_their_sources_layouts(channels_last):
    # the case hypothesis found (full kernel, 2 channels, 1 offset group, 19x19, budget at the
    # minimum): the offsets' gradient came back as a permuted view, which autograd copied into
    # the fresh `.grad` (a buffer the plan does not count) on the first backward only
    gen = nn.Sequential(nn.Linear(18, 6), nn.Tanh(), nn.Linear(6, 36)).double()
    x = torch.randn(2, 2, 19, 19, dtype=F64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    offsets = (torch.randn(2, 18, 19, 19, dtype=F64) * 2).requires_grad_()
    mask = torch.rand(2, 9, 19, 19, dtype=F64, requires_grad=True)
    args = dict(padding=1, offset_groups=1, dtype=F64)
    for side in ({"offsets": offsets}, {"offsets": offsets, "mask": mask}):
        probe = chunkconv.DynamicConv2d(gen, 2, 2, 3, budget=2**40, **args)
        budget = probe.plan(x, training=True, **side).minimum_budget
        conv = chunkconv.DynamicConv2d(gen, 2, 2, 3, budget=budget, **args)
        for call in ("first", "repeat"):
            y = conv(x, **side)
            with MemoryTracker() as bwd:
                y.backward(torch.randn_like(y))
            assert bwd.peak <= budget, (call, sorted(side), bwd.peak / budget)
            del y
        for t in (x, *side.values()):
            assert t.grad is not None and t.grad.stride() == t.stride(), (t.shape, t.stride())
            t.grad = None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_backward_stays_within_the_planned_peak(dtype):
    # the offsets' and mask's gradients accumulate in float32 and are copied into the sources'
    # dtype at the end of backward: with the offsets dominating the memory, the copies were
    # 1.26x over the planned peak before the plan counted them
    gen = nn.Sequential(nn.Linear(18, 6), nn.Tanh(), nn.Linear(6, 36)).to(dtype)
    x = torch.randn(2, 2, 64, 64, dtype=dtype).requires_grad_()
    offsets = (torch.randn(2, 18, 64, 64, dtype=dtype) * 2).requires_grad_()
    mask = torch.rand(2, 9, 64, 64, dtype=dtype, requires_grad=True)
    conv = chunkconv.DynamicConv2d(gen, 2, 2, 3, padding=1, offset_groups=1, dtype=dtype, chunk_size=256)
    plan = conv.plan(x, training=True, offsets=offsets, mask=mask)
    assert plan.fixed_backward["gradient copies in the input's dtype"] == 2 * 64 * 64 * 9 * 2 * dtype.itemsize
    y = conv(x, offsets=offsets, mask=mask)
    with MemoryTracker() as bwd:
        y.backward(torch.randn_like(y))
    assert bwd.peak <= plan.backward_peak, (bwd.peak / plan.backward_peak, plan)
    assert offsets.grad is not None and offsets.grad.dtype == dtype and mask.grad is not None


def test_offsets_equal_to_an_integer_shift_shift_the_input():
    # every tap displaced by (+1, -2): tap (a, b) of output (i, j) reads x[i + a, j + b - 3], a plain
    # convolution of x padded by 0 above, 2 below, 3 on the left and cropped by 1 on the right
    x = torch.randn(1, 2, 6, 7, dtype=F64)
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    offsets = torch.tensor([1.0, -2.0], dtype=F64).repeat(9).view(1, 18, 1, 1).expand(1, 18, 6, 7)
    y = chunkconv.dynamic_conv2d(x, lambda r: r.new_ones(r.shape[0], 9), 3, 3, padding=1, kernel="modulated",
                                 weight=w, offsets=offsets, chunk_size=11)  # fmt: skip
    torch.testing.assert_close(y, F.conv2d(F.pad(x, (3, -1, 0, 2)), w))


def test_an_empty_batch_with_offsets_runs_forward_and_backward():
    # as issue 21 made empty batches run: no reshape with -1 of zero elements on the sampled path
    from chunkconv.ops import dcnv3_core, deform_conv2d

    x = torch.randn(0, 2, 5, 5, dtype=F64, requires_grad=True)
    offsets = torch.randn(0, 18, 5, 5, dtype=F64, requires_grad=True)
    mask = torch.rand(0, 9, 5, 5, dtype=F64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    gen = lambda r: r.new_ones(r.shape[0], 9)  # noqa: E731
    y = chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1, kernel="modulated", weight=w, offsets=offsets, mask=mask)
    ref = chunkconv.dynamic_conv_reference(x, gen, out_channels=3, kernel_size=3, padding=1, kernel="modulated",
                                           weight=w, offsets=offsets, mask=mask)  # fmt: skip
    assert y.shape == ref.shape == (0, 3, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and offsets.grad.shape == offsets.shape and mask.grad.shape == mask.shape
    assert deform_conv2d(x, offsets, w, padding=1, mask=mask).shape == (0, 3, 5, 5)
    channels_last = torch.randn(0, 5, 5, 4, dtype=F64)
    offset, m = torch.zeros(0, 5, 5, 2 * 9 * 2, dtype=F64), torch.zeros(0, 5, 5, 2 * 9, dtype=F64)
    assert dcnv3_core(channels_last, offset, m, 3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0).shape == (0, 5, 5, 4)
