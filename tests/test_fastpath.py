"""The fast path: detection, cost model, and exactness against the unchunked oracle in float64."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import chunkconv
from chunkconv.autograd import DynamicConvFunction, ForwardContext
from chunkconv.call import CallOptions
from chunkconv.errors import GeneratorOutputError
from chunkconv.fast import choose_order, choose_path, contraction_costs, fast_path_bytes_per_patch
from chunkconv.fast.step import build_step
from chunkconv.functional import plan_spec
from chunkconv.geometry import conv_spec
from chunkconv.testing import RecordingDropout, assert_matches_reference, conv_cases, mlp_generator

F64 = torch.float64
ORDERS = ("weights", "patch_first", "hidden_first")


def _spec(ndim=2, c=4, o=6, k=3, groups=1, **kw):
    return conv_spec(ndim, in_channels=c, out_channels=o, kernel_size=k, groups=groups, **kw)


def _weight_numel(spec):
    return spec.out_channels * spec.in_channels // spec.groups * math.prod(spec.kernel_size)


def _patch(spec):
    return spec.in_channels * math.prod(spec.kernel_size)


def _generator(kind, spec, hidden=5, bias=True):
    p, w = _patch(spec), _weight_numel(spec)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(p, hidden), nn.Tanh(), nn.Linear(hidden, w, bias=bias)).double()
    if kind == "linear":
        return nn.Linear(p, w, bias=bias).double()
    if kind == "seq_linear":  # an nn.Sequential holding only the Linear
        return nn.Sequential(nn.Linear(p, w, bias=bias)).double()
    raise AssertionError(kind)


def _kwargs(spec, **extra):
    return dict(
        out_channels=spec.out_channels,
        kernel_size=spec.kernel_size,
        stride=spec.stride,
        padding=spec.padding,
        dilation=spec.dilation,
        groups=spec.groups,
        padding_mode=spec.padding_mode,
        **extra,
    )


def _check(gen, spec, shape, *, chunk_size, bias=True, path="fast", order=None, context=""):
    """Fast path (optionally with a forced contraction order) vs the reference: output and all gradients."""
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    b = torch.randn(spec.out_channels, dtype=F64, requires_grad=True) if bias else None
    params = list(gen.parameters())

    def run(inp):
        if order is None:
            return chunkconv.dynamic_conv(inp, gen, bias=b, chunk_size=chunk_size, path=path, **_kwargs(spec))
        unbatched = inp.dim() == spec.ndim + 1
        xb = inp.unsqueeze(0) if unbatched else inp
        geom = spec.geometry(xb.shape)
        choice = choose_path(gen, geom, F64, "fast", order=order)
        named = dict(gen.named_parameters())
        run = ForwardContext(build_step(gen, tuple(named), choice, geom), geom, chunk_size, F64)
        y = DynamicConvFunction.apply(run, b, xb, *named.values())
        return y.squeeze(0) if unbatched else y

    def reference(inp):
        return chunkconv.dynamic_conv_reference(inp, gen, bias=b, **_kwargs(spec))

    wrt = [*params, *([b] if b is not None else [])]
    assert_matches_reference(run, reference, x, wrt, context=context or f"{gen} {spec} {shape} {chunk_size=} {order=}")


@pytest.mark.parametrize("kind", ["mlp", "linear", "seq_linear"])
@pytest.mark.parametrize("linear_bias", [True, False])
@pytest.mark.parametrize("order", [None, *ORDERS])
def test_generators_and_orders_match_reference(kind, linear_bias, order):
    spec = _spec(2, c=4, o=6, k=3, groups=2, padding=1, stride=(1, 2))
    gen = _generator(kind, spec, bias=linear_bias)
    _check(gen, spec, (2, 4, 5, 6), chunk_size=7, order=order)


@pytest.mark.parametrize(
    "ndim, groups, kernel, shape, chunk_size",
    [
        (1, 1, 4, (3, 2, 11), 5),
        (1, 2, 3, (2, 4, 9), 1),
        (2, 1, (2, 3), (2, 3, 6, 5), 1000),
        (2, 3, 3, (1, 6, 5, 5), 4),
        (3, 1, 2, (2, 2, 3, 4, 3), 6),
        (3, 2, (1, 2, 2), (1, 4, 3, 3, 4), 3),
    ],
)
@pytest.mark.parametrize("order", [None, "hidden_first"])
def test_dims_groups_chunks(ndim, groups, kernel, shape, chunk_size, order):
    spec = _spec(ndim, c=shape[1], o=2 * groups, k=kernel, groups=groups, padding=1, dilation=1)
    _check(_generator("mlp", spec, hidden=3), spec, shape, chunk_size=chunk_size, order=order)


def test_unbatched_and_empty_batch():
    spec = _spec(2, c=2, o=3, k=3, padding=1)
    gen = _generator("mlp", spec)
    _check(gen, spec, (2, 4, 5), chunk_size=3)
    x = torch.randn(0, 2, 4, 5, dtype=F64, requires_grad=True)
    y = chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1, path="fast")
    assert y.shape == (0, 3, 4, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape


@given(case=conv_cases(), path=st.sampled_from(["fast", "generic"]), hidden=st.integers(1, 6), data=st.data())
def test_property_both_paths_match_reference(case, path, hidden, data):
    gen = mlp_generator(case.spec, hidden=hidden)
    linear_bias = data.draw(st.booleans(), label="linear_bias")
    if not linear_bias:
        gen[2] = nn.Linear(hidden, gen[2].out_features, bias=False).double()
    _check(gen, case.spec, case.input_shape, chunk_size=case.chunk_size, bias=case.bias, path=path, context=repr(case))


# ---------------------------------------------------------------- path choice


def _plan(gen, spec, shape=(1, 4, 5, 5), path="auto", budget="auto"):
    x = torch.randn(shape, dtype=F64)
    return plan_spec(x, gen, spec, options=CallOptions(budget=budget, path=path), training=False)


def test_auto_picks_the_fast_path_and_the_plan_says_so():
    spec = _spec()
    plan = _plan(_generator("mlp", spec), spec)
    assert plan.path.path == "fast" and plan.path.order == "patch_first"
    assert plan.path.backend == "torch" and "cpu" in plan.path.backend_reason
    assert "fast path, PyTorch, order patch_first" in str(plan)
    assert "nn.Sequential of 3 modules ending in nn.Linear" in str(plan)
    assert _plan(_generator("linear", spec), spec).path.reason == "the generator is an nn.Linear"
    generic = _plan(_generator("mlp", spec), spec, path="generic")
    assert generic.path.path == "generic" and "path='generic' given" in str(generic)


class MyLinear(nn.Linear):
    pass


def _not_linear_terminated(spec):
    p, w = _patch(spec), _weight_numel(spec)
    hooked = nn.Sequential(nn.Linear(p, 3), nn.Linear(3, w)).double()
    hooked[1].register_forward_hook(lambda m, i, o: o * 2)
    param = nn.Sequential(nn.Linear(p, 3), nn.Linear(3, w)).double()
    parametrize.register_parametrization(param[1], "weight", nn.Identity())
    return {
        "callable": (lambda t: torch.zeros(t.shape[0], w, dtype=F64), "plain callable"),
        "tanh_last": (nn.Sequential(nn.Linear(p, w), nn.Tanh()).double(), "last module of the nn.Sequential is Tanh"),
        "subclass": (MyLinear(p, w).double(), "MyLinear, not nn.Linear"),
        "empty": (nn.Sequential(), "empty nn.Sequential"),
        "hooked": (hooked, "forward hooks"),
        "parametrized": (param, "ParametrizedLinear, not nn.Linear"),
        "wrong_size": (nn.Linear(p, w + 1).double(), f"out_features={w + 1}, not one patch's weight size {w}"),
    }


@pytest.mark.parametrize("name", ["callable", "tanh_last", "subclass", "empty", "hooked", "parametrized", "wrong_size"])
def test_detection_falls_back_to_generic_with_a_reason(name):
    spec = _spec()
    gen, why = _not_linear_terminated(spec)[name]
    if name in ("empty", "wrong_size"):  # planning would run them and raise GeneratorOutputError
        choice = choose_path(gen, spec.geometry((1, 4, 5, 5)), F64)
    else:
        choice = _plan(gen, spec).path
    assert choice.path == "generic" and why in choice.reason
    with pytest.raises(ValueError, match=r"^path='fast' needs a generator that is an nn.Linear") as info:
        choose_path(gen, spec.geometry((1, 4, 5, 5)), F64, "fast")
    assert why in str(info.value)


def test_shared_parameters_fall_back():
    spec = _spec(c=1, o=1, k=1)  # P = 1, weight size 1
    inner = nn.Linear(1, 1).double()
    gen = nn.Sequential(inner, nn.Tanh(), inner)
    assert "shares its parameters" in choose_path(gen, spec.geometry((1, 1, 3, 3)), F64).reason


def test_hooked_generator_gives_the_hooked_result():
    spec = _spec(c=2, o=2)
    gen, _ = _not_linear_terminated(spec)["hooked"]
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    y = chunkconv.dynamic_conv2d(x, gen, 2, 3)
    torch.testing.assert_close(y, chunkconv.dynamic_conv_reference(x, gen, out_channels=2, kernel_size=3))


def test_wrong_sized_linear_still_raises_the_generator_error():
    spec = _spec()
    gen, _ = _not_linear_terminated(spec)["wrong_size"]
    with pytest.raises(GeneratorOutputError, match="one weight per patch"):
        chunkconv.dynamic_conv2d(torch.randn(1, 4, 5, 5, dtype=F64), gen, 6, 3)


def test_body_with_wrong_output_raises():
    gen = nn.Sequential(nn.Unflatten(1, (1, 1)), nn.Linear(1, 1)).double()  # body returns (B, 1, 1)
    with pytest.raises(GeneratorOutputError, match=r"body .* must return one row of 1 features per patch"):
        chunkconv.dynamic_conv2d(torch.randn(1, 1, 3, 3, dtype=F64), gen, 1, 1, path="fast")


@pytest.mark.parametrize("bad", ["Fast", "triton", None])
def test_invalid_path_is_refused(bad):
    spec = _spec()
    with pytest.raises(ValueError, match=r"^Invalid value for `path`"):
        chunkconv.dynamic_conv2d(torch.randn(1, 4, 5, 5, dtype=F64), _generator("mlp", spec), 6, 3, path=bad)
    with pytest.raises(ValueError, match=r"^Invalid value for `path`"):
        chunkconv.DynamicConv(_generator("mlp", spec), 4, 6, 3, path=bad)


def test_module_path_argument_and_repr():
    spec = _spec()
    conv = chunkconv.DynamicConv(_generator("mlp", spec), 4, 6, 3, padding=1, path="generic", dtype=F64)
    assert "path='generic'" in repr(conv)
    x = torch.randn(1, 4, 5, 5, dtype=F64)
    conv_fast = chunkconv.DynamicConv(conv.generator, 4, 6, 3, padding=1, path="fast", dtype=F64)
    conv_fast.bias = conv.bias
    torch.testing.assert_close(conv(x), conv_fast(x))


# ---------------------------------------------------------------- cost model


def test_cost_model_orders():
    # workload B: P = 144, O = 16, H = 32: T (O*H = 512) is the smallest intermediate
    b = _spec(c=16, o=16).geometry((1, 16, 8, 8))
    assert choose_order(b, 32, torch.float32).order == "patch_first"
    # one input channel, wide hidden: the weights (O*Pg = 9 * O) are smaller than T (64 * O)
    assert choose_order(_spec(c=1, o=8).geometry((1, 1, 8, 8)), 64, torch.float32).order == "weights"
    # many outputs, tiny patches: h (x) x (H*P = 18) beats both O*P and O*H
    assert choose_order(_spec(c=2, o=64, k=(1, 3)).geometry((1, 2, 8, 8)), 3, torch.float32).order == "hidden_first"
    costs = {c.order: c for c in contraction_costs(b, 32)}
    main = 2 * 16 * 144 * 32
    assert all(c.flops >= main for c in costs.values())
    assert (costs["weights"].intermediate, costs["patch_first"].intermediate, costs["hidden_first"].intermediate) == (
        16 * 144,
        16 * 32,
        32 * 144,
    )


def test_bytes_per_patch_for_the_planner():
    geom = _spec(c=16, o=16).geometry((1, 16, 8, 8))
    f32 = fast_path_bytes_per_patch(geom, 32, torch.float32)
    assert f32.order == "patch_first"
    # patches, h, T = x @ [W | c] with the bias folded in as an (H + 1)-th feature, h' = [h, 1], output
    assert f32.forward == (144 + 32 + 16 * 33 + 33 + 2 * 16) * 4
    assert f32.backward > f32.forward
    assert fast_path_bytes_per_patch(geom, 32, torch.bfloat16).forward * 2 == f32.forward
    weights = fast_path_bytes_per_patch(geom, 32, torch.float32, "weights")
    assert weights.forward > f32.forward  # the generic order writes the 16 x 144 weights
    # under the same budget the fast path, which never forms the weights, takes larger chunks
    spec = _spec(c=16, o=16)
    gen = nn.Sequential(nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, 16 * 144)).double()
    fast = _plan(gen, spec, (1, 16, 64, 64), budget="8MB")
    generic = _plan(gen, spec, (1, 16, 64, 64), path="generic", budget="8MB")
    assert fast.chunk_size > generic.chunk_size > 1
    assert fast.cost.forward.per_patch < generic.cost.forward.per_patch


# ---------------------------------------------------------------- autograd discipline


def test_dropout_in_the_body_is_replayed_and_matches_the_generic_path():
    drop = RecordingDropout()
    gen = nn.Sequential(nn.Linear(27, 6), nn.Tanh(), drop, nn.Linear(6, 4 * 27)).double()
    x = torch.randn(2, 3, 5, 6, dtype=F64, requires_grad=True)
    torch.manual_seed(1)
    y_generic = chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=7, path="generic")
    torch.manual_seed(1)
    y = chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=7, path="fast")
    torch.testing.assert_close(y, y_generic)  # same RNG draws in the same order
    forward_masks = drop.masks[-9:]
    drop.masks.clear()
    upstream = torch.randn_like(y)
    rng_before = torch.get_rng_state()
    grads = torch.autograd.grad(y, [x, *gen.parameters()], upstream)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert len(drop.masks) == 9 and all(torch.equal(a, b) for a, b in zip(forward_masks, drop.masks))
    drop.fixed = torch.cat(forward_masks)
    want = chunkconv.dynamic_conv_reference(x, gen, out_channels=4, kernel_size=3, padding=1)
    torch.testing.assert_close(y, want)
    for g, w in zip(grads, torch.autograd.grad(want, [x, *gen.parameters()], upstream)):
        torch.testing.assert_close(g, w)


def test_parameters_are_explicit_inputs_and_hooks_fire_once():
    spec = _spec(c=3, o=4)
    gen = _generator("mlp", spec)
    x = torch.randn(1, 3, 5, 5, dtype=F64, requires_grad=True)
    w_last = gen[2].weight
    seen = []
    w_last.register_hook(lambda g: seen.append(g))
    chunkconv.dynamic_conv2d(x, gen, 4, 3, chunk_size=2, path="fast").sum().backward(inputs=[w_last])
    assert len(seen) == 1 and x.grad is None and gen[0].weight.grad is None and gen[2].bias.grad is None
    assert w_last.grad.abs().sum() > 0


@pytest.mark.parametrize("frozen", ["body", "tail", "all"])
def test_only_requested_gradients(frozen):
    spec = _spec(c=3, o=4)
    gen = _generator("mlp", spec)
    if frozen in ("body", "all"):
        gen[0].requires_grad_(False)
    if frozen in ("tail", "all"):
        gen[2].requires_grad_(False)
    x = torch.randn(1, 3, 5, 5, dtype=F64, requires_grad=True)
    chunkconv.dynamic_conv2d(x, gen, 4, 3, chunk_size=4, path="fast").sum().backward()
    assert x.grad is not None
    for p in gen.parameters():
        assert (p.grad is not None) == p.requires_grad


def test_forward_saves_only_the_input_and_parameters():
    spec = _spec(c=3, o=4)
    gen = _generator("mlp", spec)
    x = torch.randn(2, 3, 8, 8, dtype=F64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, chunk_size=16, path="fast")
    assert sum(t.numel() for t in saved) == x.numel() + sum(p.numel() for p in gen.parameters())


def test_autocast_matches_the_generic_path():
    gen = nn.Sequential(nn.Linear(27, 8), nn.ReLU(), nn.Linear(8, 4 * 27))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast = chunkconv.dynamic_conv2d(x, gen, 4, 3, chunk_size=10, path="fast")
        y_gen = chunkconv.dynamic_conv2d(x, gen, 4, 3, chunk_size=10, path="generic")
    assert y_fast.dtype == y_gen.dtype == torch.bfloat16
    want = chunkconv.dynamic_conv_reference(x.double(), gen.double(), out_channels=4, kernel_size=3)
    torch.testing.assert_close(y_fast.double(), want, rtol=0.05, atol=0.1)
    gen.float()
    (g_fast,) = torch.autograd.grad(y_fast.float().sum(), x)
    (g_gen,) = torch.autograd.grad(y_gen.float().sum(), x)
    torch.testing.assert_close(g_fast, g_gen, rtol=0.05, atol=0.1)


# ---------------------------------------------------------------- benchmark scripts (smoke, tiny sizes)


def _load_script(name, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_scripts_run_on_tiny_sizes(capsys, monkeypatch):
    monkeypatch.setenv("CHUNKCONV_TRITON", "1")
    rows = _load_script("fastpath_gpu", monkeypatch).main(
        ["--tiny", "--device", "cpu", "--repeats", "1", "--workloads", "AB", "--dtypes", "float32"]
    )
    assert [r["method"] for r in rows] == ["einsum", "generic", "fast-torch", "fast"] * 2
    assert all(r["s"] > 0 and r["peak"] >= 0 and r["chunk"] >= 1 for r in rows)
    med = _load_script("fastpath_cpu", monkeypatch).main(["--size", "12", "--repeats", "1", "--no-memory"])
    assert set(med) == {"fast", "generic"}
    out = capsys.readouterr().out
    assert "speedup vs einsum" in out and "fast / generic:" in out


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_budget_check_script_reports_peaks_within_the_budget(path, capsys, monkeypatch):
    result = _load_script("budget_check", monkeypatch).main(["--size", "24", "--budget", "4MB", "--path", path])
    assert max(result["forward_peak"], result["backward_peak"]) <= result["budget"] == 4_000_000
    assert ": within" in capsys.readouterr().out


# ---------------------------------------------------------------- patch layout


@pytest.mark.parametrize(
    "body, layout",
    [
        (lambda p: nn.Sequential(nn.Linear(p, 5), nn.GELU(), nn.Dropout(0.0), nn.Linear(5, 5)), "columns"),
        (lambda p: nn.Sequential(nn.Linear(p, 5), nn.LayerNorm(5)), "rows"),  # not in the layout-free set
        (lambda p: None, "columns"),  # a bare nn.Linear generator
    ],
)
@pytest.mark.parametrize("grad", [True, False])
def test_layout_free_bodies_read_columns_and_match_the_reference(body, layout, grad):
    spec = _spec(2, c=3, o=4, k=3, padding=1)
    p, w = _patch(spec), _weight_numel(spec)
    b = body(p)
    gen = (nn.Linear(p, w) if b is None else nn.Sequential(*b, nn.Linear(5, w))).double()
    geom = spec.geometry((2, 3, 6, 7))
    choice = choose_path(gen, geom, F64, "fast")
    assert build_step(gen, tuple(dict(gen.named_parameters())), choice, geom).patch_layout == layout
    if grad:
        _check(gen, spec, (2, 3, 6, 7), chunk_size=9)
    else:  # inference: chunks of 9 patches, the last one shorter
        x = torch.randn(2, 3, 6, 7, dtype=F64)
        with torch.no_grad():
            y = chunkconv.dynamic_conv(x, gen, chunk_size=9, path="fast", **_kwargs(spec))
            expected = chunkconv.dynamic_conv_reference(x, gen, **_kwargs(spec))
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
