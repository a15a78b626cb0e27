"""The budget holds on every call, the first one (which plans, probing the generator) included."""

import copy

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import chunkconv
from chunkconv import MemoryTracker
from chunkconv.testing import Concat, conv_cases


@st.composite
def generators(draw, spec, dtype):
    """A few shapes of generator people write: MLPs (fast path), a bare Linear, a normalised body."""
    p = spec.in_channels * torch.Size(spec.kernel_size).numel()
    w = spec.out_channels * spec.in_channels // spec.groups * torch.Size(spec.kernel_size).numel()
    hidden = draw(st.integers(1, 48), label="hidden")
    kind = draw(st.sampled_from(["mlp", "linear", "layernorm", "deep"]), label="kind")
    if kind == "linear":
        gen = nn.Linear(p, w)
    elif kind == "layernorm":
        gen = nn.Sequential(nn.Linear(p, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, w))
    elif kind == "deep":
        gen = nn.Sequential(nn.Linear(p, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, w))
    else:
        gen = nn.Sequential(nn.Linear(p, hidden), nn.ReLU(), nn.Linear(hidden, w))
    return gen.to(dtype)


@given(
    case=conv_cases(ndims=(1, 2), allow_empty=False, max_batch=2),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    training=st.booleans(),
    path=st.sampled_from(["auto", "generic"]),
    data=st.data(),
)
def test_first_and_repeat_calls_stay_within_random_budgets(case, dtype, training, path, data):
    s = case.spec
    gen = data.draw(generators(s, dtype), label="generator")
    x = torch.randn(case.input_shape, dtype=dtype, requires_grad=training)
    args = dict(stride=s.stride, padding=s.padding, dilation=s.dilation, groups=s.groups, padding_mode=s.padding_mode)
    # the smallest feasible budget, planned on a copy so that the real call's first plan is its own
    minimum = chunkconv.plan(x, copy.deepcopy(gen), s.out_channels, s.kernel_size, path=path,
                             budget=2**40, training=training, **args).minimum_budget  # fmt: skip
    factor = data.draw(st.floats(1.0, 3.0), label="budget / minimum")
    budget = int(minimum * factor)
    conv = chunkconv.DynamicConv(gen, s.in_channels, s.out_channels, s.kernel_size, bias=case.bias, budget=budget,
                                 path=path, dtype=dtype, **args)  # fmt: skip
    for call in ("first", "repeat"):
        with torch.set_grad_enabled(training), MemoryTracker() as fwd:
            y = conv(x)
        assert fwd.peak <= budget, (call, "forward", fwd.peak / budget, conv.plan(x, training=training))
        if training:
            upstream = torch.randn_like(y)
            with MemoryTracker() as bwd:
                y.backward(upstream)
            assert bwd.peak <= budget, (call, "backward", bwd.peak / budget, conv.plan(x, training=training))
        del y


@given(
    case=conv_cases(ndims=(3,), allow_empty=False, max_batch=2),
    features=st.integers(1, 4),
    hidden=st.integers(1, 16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    training=st.booleans(),
    factor=st.sampled_from([1.0, 1.001, 1.05, 1.5]),
)
def test_first_calls_with_features_in_3d_stay_within_budgets_at_the_minimum(
    case, features, hidden, dtype, training, factor
):
    s = case.spec
    p = s.in_channels * torch.Size(s.kernel_size).numel()
    w = s.out_channels * s.in_channels // s.groups * torch.Size(s.kernel_size).numel()
    gen = Concat(p + features, w, hidden).to(dtype)  # issue 21, item 7's case: 3-D, features
    x = torch.randn(case.input_shape, dtype=dtype, requires_grad=training)
    args = dict(stride=s.stride, padding=s.padding, dilation=s.dilation, groups=s.groups, padding_mode=s.padding_mode)
    args |= dict(inputs=("patches", "features"))
    batched = x.shape if x.dim() == 5 else (1, *x.shape)
    out = s.geometry(batched).out_spatial
    f = torch.randn(*x.shape[:-4], features, *out, dtype=dtype, requires_grad=training)
    minimum = chunkconv.plan(x, copy.deepcopy(gen), s.out_channels, s.kernel_size, budget=2**40,
                             training=training, features=f, **args).minimum_budget  # fmt: skip
    budget = int(minimum * factor)
    conv = chunkconv.DynamicConv(gen, s.in_channels, s.out_channels, s.kernel_size, bias=case.bias, budget=budget,
                                 dtype=dtype, **args)  # fmt: skip
    for call in ("first", "repeat"):
        with torch.set_grad_enabled(training), MemoryTracker() as fwd:
            y = conv(x, features=f)
        assert fwd.peak <= budget, (call, "forward", fwd.peak / budget, conv.plan(x, training=training, features=f))
        if training:
            with MemoryTracker() as bwd:
                y.backward(torch.randn_like(y))
            assert bwd.peak <= budget, (
                call,
                "backward",
                bwd.peak / budget,
                conv.plan(x, training=training, features=f),
            )
        del y
