"""Kernel forms x side inputs against the float64 reference: output and every gradient.

Every form (full, modulated, shared) with every combination of generator inputs (patches,
features, guide, positions, in any order), over the usual geometry, at random chunk sizes: the
result equals the unchunked reference, so it does not depend on the chunking.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import chunkconv
from chunkconv import MemoryTracker
from chunkconv.geometry import conv_spec
from chunkconv.testing import Concat, conv_cases

F64 = torch.float64


@st.composite
def form_cases(draw):
    case = draw(conv_cases(ndims=(1, 2, 3), allow_empty=False, max_batch=2), label="case")
    kernel = draw(st.sampled_from(["full", "modulated", "shared"]), label="kernel")
    spec, kwargs = case.spec, dict(case.kwargs)
    kernel_groups = None
    if kernel == "shared":  # depthwise: out = in channels, groups=1
        kwargs.update(out_channels=spec.in_channels, groups=1)
        spec = conv_spec(spec.ndim, in_channels=spec.in_channels, **kwargs)
        kernel_groups = draw(
            st.sampled_from([g for g in (1, 2, 4) if spec.in_channels % g == 0]), label="kernel_groups"
        )
    kinds = draw(st.lists(st.sampled_from(["patches", "features", "guide", "positions"]), min_size=1, max_size=4,
                          unique=True), label="inputs")  # fmt: skip
    return case, spec, kwargs, kernel, kernel_groups, tuple(kinds)


def _side(case, spec, kinds, draw_channels):
    shape = case.input_shape
    unbatched = len(shape) == spec.ndim + 1
    batched = shape if not unbatched else (1, *shape)
    geom = spec.geometry(batched)
    lead = () if unbatched else (batched[0],)
    side, widths = {}, {"patches": geom.patch_size, "positions": spec.ndim}
    if "features" in kinds:
        f = draw_channels("features")
        side["features"] = torch.randn(*lead, f, *geom.out_spatial, dtype=F64, requires_grad=True)
        widths["features"] = f
    if "guide" in kinds:
        g = draw_channels("guide")
        side["guide"] = torch.randn(*lead, g, *geom.in_spatial, dtype=F64, requires_grad=True)
        widths["guide"] = g * geom.kernel_numel
    return geom, side, widths


def _generated_size(kernel, geom, kernel_groups, per_channel):
    if kernel == "full":
        return geom.weight_numel
    if kernel == "modulated":
        return geom.kernel_numel * (geom.in_channels if per_channel else 1)
    return kernel_groups * geom.kernel_numel


@given(cases=form_cases(), data=st.data())
def test_every_form_and_side_input_matches_reference(cases, data):
    case, spec, kwargs, kernel, kernel_groups, kinds = cases
    geom, side, widths = _side(case, spec, kinds, lambda name: data.draw(st.integers(1, 3), label=f"{name} channels"))
    per_channel = data.draw(st.booleans(), label="per-channel modulation")
    gen = Concat(sum(widths[k] for k in kinds), _generated_size(kernel, geom, kernel_groups, per_channel)).double()
    conv = chunkconv.DynamicConv(
        gen, spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride, padding=spec.padding,
        dilation=spec.dilation, groups=spec.groups, bias=case.bias, padding_mode=spec.padding_mode, dtype=F64,
        chunk_size=case.chunk_size, kernel=kernel, kernel_groups=kernel_groups, inputs=kinds,
    )  # fmt: skip
    x = torch.randn(case.input_shape, dtype=F64, requires_grad=True)
    leaves = [x, *side.values(), *conv.parameters()]
    y = conv(x, **side)
    ref = chunkconv.dynamic_conv_reference(
        x, gen, **kwargs, bias=conv.bias, kernel=kernel, weight=conv.weight, kernel_groups=kernel_groups,
        inputs=kinds, **side,
    )  # fmt: skip
    context = f"{case} {kernel=} {kernel_groups=} {kinds=}"
    torch.testing.assert_close(y, ref, rtol=1e-7, atol=1e-9, msg=lambda m: f"output: {m}\n{context}")
    upstream = torch.randn_like(ref)
    got = torch.autograd.grad(y, leaves, upstream, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, upstream, allow_unused=True)
    names = ["input", *side, *(n for n, _ in conv.named_parameters())]
    for name, g, w, leaf in zip(names, got, want, leaves):
        g = torch.zeros_like(leaf) if g is None else g
        w = torch.zeros_like(leaf) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}\n{context}")


@given(cases=form_cases(), training=st.booleans(), factor=st.floats(1.0, 3.0), data=st.data())
def test_forms_and_side_inputs_keep_random_budgets_on_first_and_repeat_calls(cases, training, factor, data):
    case, spec, kwargs, kernel, kernel_groups, kinds = cases
    geom, side, widths = _side(case, spec, kinds, lambda name: data.draw(st.integers(1, 8), label=f"{name} channels"))
    for t in side.values():
        t.requires_grad_(training)
    hidden = data.draw(st.integers(1, 32), label="hidden")
    size = _generated_size(kernel, geom, kernel_groups, False)

    def make():
        torch.manual_seed(0)
        return Concat(sum(widths[k] for k in kinds), size, hidden).double()

    args = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=spec.groups,
                padding_mode=spec.padding_mode, kernel=kernel, kernel_groups=kernel_groups, inputs=kinds)  # fmt: skip
    x = torch.randn(case.input_shape, dtype=F64, requires_grad=training)
    probe = chunkconv.DynamicConv(make(), spec.in_channels, spec.out_channels, spec.kernel_size, dtype=F64,
                                  budget=2**40, **args)  # fmt: skip
    minimum = probe.plan(x, training=training, **side).minimum_budget
    budget = int(minimum * factor)
    conv = chunkconv.DynamicConv(make(), spec.in_channels, spec.out_channels, spec.kernel_size, dtype=F64,
                                 budget=budget, **args)  # fmt: skip
    for call in ("first", "repeat"):
        with torch.set_grad_enabled(training), MemoryTracker() as fwd:
            y = conv(x, **side)
        assert fwd.peak <= budget, (call, "forward", fwd.peak / budget, conv.plan(x, training=training, **side))
        if training:
            with MemoryTracker() as bwd:
                y.backward(torch.randn_like(y))
            assert bwd.peak <= budget, (call, "backward", bwd.peak / budget, conv.plan(x, training=training, **side))
        del y


def test_pure_kernel_prediction_ignores_the_patch():
    # a KPN: a predictor's features alone make each pixel's 5x5 kernel, shared over the channels
    x = torch.randn(2, 3, 12, 10, dtype=F64, requires_grad=True)
    feats = torch.randn(2, 7, 12, 10, dtype=F64, requires_grad=True)
    predictor = nn.Sequential(nn.Linear(7, 25), nn.Softmax(dim=1)).double()
    conv = chunkconv.DynamicConv2d(predictor, 3, 3, 5, padding=2, kernel="shared", inputs=("features",),
                                   bias=False, chunk_size=17, dtype=F64)  # fmt: skip
    y = conv(x, features=feats)
    kernels = predictor(feats.movedim(1, -1).reshape(-1, 7)).reshape(2, 12 * 10, 25).transpose(1, 2)
    patches = torch.nn.functional.unfold(x, 5, padding=2).view(2, 3, 25, 120)
    want = (patches * kernels.unsqueeze(1)).sum(2).view(2, 3, 12, 10)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(*(torch.autograd.grad(t.sum(), feats)[0] for t in (y, want)))


def test_positions_are_window_centres_normalised_like_grid_sample():
    seen = []

    taps = [1]

    def record(pos):
        seen.append(pos)
        return torch.ones(pos.shape[0], taps[0], dtype=pos.dtype)

    x = torch.zeros(1, 1, 4, 6, dtype=F64)
    chunkconv.dynamic_conv2d(x, record, 1, 1, kernel="shared", inputs=("positions",), chunk_size=1000)  # no probes
    pos = torch.cat(seen).view(4, 6, 2)
    # align_corners=False: pixel i of n sits at (2 i + 1) / n - 1; rows (H) first, then columns (W)
    torch.testing.assert_close(pos[:, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=F64))
    torch.testing.assert_close(pos[0, :, 1], (2 * torch.arange(6, dtype=F64) + 1) / 6 - 1)
    seen.clear()
    taps[0] = 9
    chunkconv.dynamic_conv2d(x, record, 1, 3, stride=2, kernel="shared", inputs=("positions",), chunk_size=1000)
    # 2 locations: window centres at pixel (1, 1) and (1, 3) of the 4 x 6 input
    torch.testing.assert_close(torch.cat(seen), torch.tensor([[-0.25, -0.5], [-0.25, 7 / 6 - 1]], dtype=F64))


@pytest.mark.parametrize(
    "kwargs, side, message",
    [
        (
            dict(inputs=("features",)),
            {},
            r"inputs=\('features',\) gives the generator `features`, but .* got no `features=`",
        ),
        (dict(), {"guide": torch.zeros(1, 1, 6, 6)}, r"got `guide=` but inputs=\('patches',\) does not give it"),
        (
            dict(inputs=("features",)),
            {"features": torch.zeros(1, 3, 5, 6)},
            r"Invalid shape for `features` .*expected \(1, 'F', 6, 6\)",
        ),
        (
            dict(inputs=("guide",)),
            {"guide": torch.zeros(2, 3, 6, 6)},
            r"Invalid shape for `guide` .*expected \(1, 'G', 6, 6\)",
        ),
        (dict(kernel="shared", kernel_groups=3), {}, r"`kernel_groups`; expected an int >= 1 dividing in_channels=2"),
        (dict(kernel="shared"), {}, r"out_channels must equal in_channels"),
        (dict(kernel="bent"), {}, r"Invalid value for `kernel`"),
        (dict(inputs=("patches", "patches")), {}, r"each kind at most once"),
        (dict(inputs=("pixels",)), {}, r"Invalid value for `inputs`"),
    ],
)
def test_side_input_and_form_mistakes_are_refused_before_any_work(kwargs, side, message):
    calls = []
    gen = lambda *rows: calls.append(rows) or rows[0]  # noqa: E731
    x = torch.zeros(1, 2, 6, 6)
    out = 2 if kwargs.get("kernel") == "shared" and "kernel_groups" in kwargs else 4
    with pytest.raises(ValueError, match=message):
        chunkconv.dynamic_conv2d(x, gen, out, 3, padding=1, **kwargs, **side)
    assert calls == []


def test_modulated_weight_is_initialised_like_conv_and_trains():
    torch.manual_seed(0)
    conv = chunkconv.DynamicConv2d(nn.Sequential(nn.Linear(18, 9), nn.Sigmoid()), 2, 4, 3, kernel="modulated")
    ref = nn.Conv2d(2, 4, 3)
    bound = 1 / math.sqrt(2 * 9)
    assert conv.weight.shape == ref.weight.shape and conv.weight.abs().max() <= bound
    assert "kernel='modulated'" in repr(conv)
    conv(torch.randn(1, 2, 8, 8)).sum().backward()
    assert conv.weight.grad is not None and conv.generator[0].weight.grad is not None
    assert set(conv.state_dict()) == {"weight", "bias", "generator.0.weight", "generator.0.bias"}


def _kpn_and_pac(dtype=F64, chunk_size=13):
    torch.manual_seed(0)
    kpn = chunkconv.DynamicConv2d(nn.Sequential(nn.Linear(5, 25), nn.Softmax(dim=1)), 3, 3, 5, padding=2,
                                  kernel="shared", inputs=("features",), chunk_size=chunk_size, dtype=dtype)  # fmt: skip
    pac = chunkconv.DynamicConv2d(nn.Sequential(nn.Linear(18, 9), nn.Sigmoid()), 3, 4, 3, padding=1,
                                  kernel="modulated", inputs=("guide",), chunk_size=chunk_size, dtype=dtype)  # fmt: skip
    return kpn.to(dtype), pac.to(dtype)


def test_forms_with_side_inputs_run_under_autocast():
    kpn, pac = _kpn_and_pac(torch.float32)
    x, f, g = torch.randn(2, 3, 9, 8), torch.randn(2, 5, 9, 8), torch.randn(2, 2, 9, 8)
    want = pac(kpn(x, features=f), guide=g)
    leaves = [x.requires_grad_(), f.requires_grad_(), g.requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pac(kpn(x, features=f), guide=g)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
    grads = torch.autograd.grad(got.float().sum(), leaves)
    want_grads = torch.autograd.grad(pac(kpn(x, features=f), guide=g).sum(), leaves)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.1)


def test_forms_with_side_inputs_compile_with_one_graph_break_each():
    kpn, pac = _kpn_and_pac()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch, self.kpn, self.pac = nn.Conv2d(3, 5, 1).double(), kpn, pac

        def forward(self, x, g):
            return self.pac(self.kpn(x, features=self.branch(x).tanh()), guide=g).relu()

    net = Net()
    x, g = torch.randn(1, 3, 8, 8, dtype=F64, requires_grad=True), torch.randn(1, 2, 8, 8, dtype=F64)
    eager = net(x, g)
    compiled = torch.compile(net, backend="eager")(x, g)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(*(torch.autograd.grad(t.sum(), x)[0] for t in (compiled, eager)))


def test_dropout_in_a_side_input_generator_is_replayed_in_backward():
    from chunkconv.testing import RecordingDropout

    drop = RecordingDropout()
    gen = nn.Sequential(nn.Linear(5, 8), drop, nn.Linear(8, 9)).double()
    x = torch.randn(2, 3, 6, 5, dtype=F64, requires_grad=True)
    f = torch.randn(2, 5, 6, 5, dtype=F64, requires_grad=True)
    args = dict(kernel="shared", inputs=("features",))
    chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1, chunk_size=11, features=f, **args)  # also checks the generator
    drop.masks.clear()
    y = chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1, chunk_size=11, features=f, **args)
    forward_masks = list(drop.masks)
    drop.masks.clear()
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, f, *gen.parameters()], upstream)
    assert len(drop.masks) == len(forward_masks) == 6
    assert all(torch.equal(a, b) for a, b in zip(forward_masks, drop.masks))
    drop.fixed = torch.cat(forward_masks)  # the function with exactly those masks
    want = chunkconv.dynamic_conv_reference(x, gen, out_channels=3, kernel_size=3, padding=1, features=f, **args)
    torch.testing.assert_close(y, want)
    for a, b in zip(grads, torch.autograd.grad(want, [x, f, *gen.parameters()], upstream)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", ["full", "modulated", "shared"])
def test_empty_batch_with_side_inputs_matches_the_reference(kernel):
    x = torch.randn(0, 2, 5, 5, dtype=F64, requires_grad=True)
    f = torch.randn(0, 3, 5, 5, dtype=F64, requires_grad=True)
    size = {"full": 2 * 2 * 9, "modulated": 2 * 9, "shared": 9}[kernel]
    gen = Concat(2 * 9 + 3, size).double()
    conv = chunkconv.DynamicConv2d(gen, 2, 2, 3, padding=1, kernel=kernel, inputs=("patches", "features"), dtype=F64)
    y = conv(x, features=f)
    ref = chunkconv.dynamic_conv_reference(
        x, gen, out_channels=2, kernel_size=3, padding=1, bias=conv.bias, kernel=kernel, weight=conv.weight,
        inputs=("patches", "features"), features=f,
    )  # fmt: skip
    assert y.shape == ref.shape == (0, 2, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and f.grad.shape == f.shape
    assert all(p.grad is not None and not p.grad.any() for p in conv.parameters())


@pytest.mark.parametrize(
    ("kernel", "inputs", "columns"),
    [
        ("shared", ("features",), True),
        ("modulated", ("guide",), True),
        ("modulated", ("positions", "features"), True),
        ("shared", ("patches", "features"), False),  # the generator takes the patches: contiguous rows
        ("full", ("features",), False),
    ],
)
def test_structured_forms_read_the_patches_in_columns_unless_the_generator_takes_them(
    monkeypatch, kernel, inputs, columns
):
    import chunkconv.gather as gather

    calls = []
    real = gather.gather_patch_columns
    monkeypatch.setattr(gather, "gather_patch_columns", lambda *a: calls.append(a) or real(*a))
    widths = {"patches": 2 * 9, "features": 3, "guide": 9, "positions": 2}
    out = {"full": 2 * 2 * 9, "modulated": 9, "shared": 9}[kernel]
    gen = Concat(sum(widths[k] for k in inputs), out).double()
    conv = chunkconv.DynamicConv2d(
        gen, 2, 2, 3, padding=1, kernel=kernel, inputs=inputs, chunk_size=13, dtype=F64, padding_mode="reflect"
    )
    x = torch.randn(2, 2, 7, 6, dtype=F64, requires_grad=True)
    side = {"features": torch.randn(2, 3, 7, 6, dtype=F64), "guide": torch.randn(2, 1, 7, 6, dtype=F64)}
    side = {k: v for k, v in side.items() if k in inputs}
    y = conv(x, **side)
    upstream = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, upstream)
    assert bool(calls) is columns
    ref = chunkconv.dynamic_conv_reference(
        x, gen, out_channels=2, kernel_size=3, padding=1, padding_mode="reflect", bias=conv.bias, kernel=kernel,
        weight=conv.weight,
        inputs=inputs, **side,
    )  # fmt: skip
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(got, torch.autograd.grad(ref, x, upstream)[0])
