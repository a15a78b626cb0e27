"""Issue 21: cases where training was silently wrong (no gradients, other masks, other buffers,
memory of another device) are now right or refused before any result."""

import copy
import threading
from collections import defaultdict

import pytest
import torch
from torch import nn

import chunkconv
from chunkconv.errors import BatchCoupledGeneratorError, GeneratorOutputError

F64 = torch.float64
P = 2 * 9


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(P, 8), nn.Tanh(), nn.Linear(8, 3 * P)).to(F64)


def _x():
    return torch.randn(1, 2, 6, 6, dtype=F64, requires_grad=True)


# -- 1. generators whose parameters backward cannot reach -----------------------------------


class _ListOfLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(P, 3 * P).to(F64)]  # a plain list: not registered

    def forward(self, p):
        return self.layers[0](p)


@pytest.mark.parametrize(
    "wrap, match",
    [
        (torch.jit.script, "TorchScript module"),
        (lambda m: torch.jit.trace(m, torch.randn(4, P, dtype=F64)), "TorchScript module"),
        (lambda m: torch.compile(m, backend="eager"), r"torch.compile'd module.*_orig_mod"),
        (lambda m: _ListOfLayers(), "plain Python list"),
    ],
    ids=["jit.script", "jit.trace", "compile", "plain-list"],
)
def test_wrapped_generators_are_refused_before_any_result(wrap, match):
    gen = wrap(_mlp())
    x = _x()
    with pytest.raises(ValueError, match=rf"^Invalid `generator` for dynamic_conv2d: .*{match}"):
        chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1)
    assert x.grad is None
    with torch.no_grad():  # nothing to differentiate: they run
        assert chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1).shape == (1, 3, 6, 6)


def test_frozen_parameters_in_a_plain_list_are_accepted():
    gen = _ListOfLayers().requires_grad_(False)
    for layer in gen.layers:
        layer.requires_grad_(False)
    x = _x()
    chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1).sum().backward()
    assert x.grad is not None


# -- 2. threads and random numbers --------------------------------------------------------------


class _Recording(nn.Module):
    """Draws a random factor per row and records, per thread, what forward and backward drew."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(P, 3 * P).to(F64)
        self.drop = nn.Dropout(0.5)
        self.log = None

    def forward(self, p):
        noise = torch.rand(p.shape[0], 1, dtype=p.dtype)
        if self.log is not None:
            phase = "backward" if torch.is_grad_enabled() else "forward"
            self.log[threading.get_ident(), phase].append(noise)
        return self.drop(self.lin(p)) * (1 + noise)


def test_two_threads_with_dropout_replay_their_own_draws():
    gen = _Recording()
    conv = chunkconv.DynamicConv2d(gen, 2, 3, 3, padding=1, chunk_size=3, dtype=F64)
    x = torch.randn(2, 2, 6, 6, dtype=F64)
    conv(x.requires_grad_()).sum().backward()  # the checks' probe runs once, before recording
    gen.log = defaultdict(list)
    errors = []

    def train():
        try:
            for _ in range(6):
                conv(x.detach().requires_grad_()).square().sum().backward()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=train) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    idents = {ident for ident, _ in gen.log}
    assert len(idents) == 2
    for ident in idents:
        drawn, replayed = gen.log[ident, "forward"], gen.log[ident, "backward"]
        assert len(drawn) == len(replayed) == 6 * 24
        differ = sum(not torch.equal(a, b) for a, b in zip(drawn, replayed))
        assert differ == 0, f"{differ} of {len(drawn)} chunks replayed other random numbers than forward drew"


# -- 3. generators whose forward updates their buffers ------------------------------------------


def _spectral(api):
    torch.manual_seed(0)
    return nn.Sequential(api(nn.Linear(P, 8)), nn.Tanh(), nn.Linear(8, 3 * P)).to(F64)


SPECTRAL = [torch.nn.utils.spectral_norm, torch.nn.utils.parametrizations.spectral_norm]


@pytest.mark.parametrize("api", SPECTRAL, ids=["hook", "parametrization"])
def test_spectral_norm_in_training_mode_is_refused_without_the_opt_in(api):
    gen = _spectral(api)
    before = {n: b.clone() for n, b in gen.named_buffers()}
    with pytest.raises(BatchCoupledGeneratorError, match=r"updates its state on every call.*allow_batch_coupled=True"):
        chunkconv.dynamic_conv2d(_x(), gen, 3, 3, padding=1)
    assert all(torch.equal(b, before[n]) for n, b in gen.named_buffers())  # the check ran on copies
    gen.eval()
    chunkconv.dynamic_conv2d(_x(), gen, 3, 3, padding=1).sum().backward()


@pytest.mark.parametrize("api", SPECTRAL, ids=["hook", "parametrization"])
@pytest.mark.parametrize("path", ["generic", "fast"])
def test_spectral_norm_with_the_opt_in_replays_the_buffers_forward_saw(api, path):
    gen = _spectral(api)
    oracle = copy.deepcopy(gen)
    x = _x()
    y = chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1, allow_batch_coupled=True, path=path)
    y.square().sum().backward()
    x2 = x.detach().requires_grad_()
    want = chunkconv.dynamic_conv_reference(x2, oracle, out_channels=3, kernel_size=3, padding=1)
    want.square().sum().backward()
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    for p, q in zip(gen.parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    for (n, b), c in zip(gen.named_buffers(), oracle.buffers()):  # forward updated them once, as the oracle
        torch.testing.assert_close(b, c, rtol=0, atol=1e-12, msg=n)


# -- 4. a generator answering on another device ------------------------------------------------


@pytest.mark.parametrize("kernel, width, out", [("full", 3 * P, 3), ("shared", 9, 2), ("modulated", 9, 3)])
def test_output_on_another_device_is_refused(kernel, width, out):
    def gen(p):
        return torch.zeros(p.shape[0], width, dtype=p.dtype, device="meta")

    weight = torch.randn(3, 2, 3, 3) if kernel == "modulated" else None
    with pytest.raises(GeneratorOutputError, match=r"on the device of its input: expected cpu, got meta"):
        chunkconv.dynamic_conv2d(torch.randn(1, 2, 6, 6), gen, out, 3, padding=1, kernel=kernel, weight=weight)


# -- 5, 6. budgets at the plan's minimum: gradients in the layout autograd keeps, circular padding --------


def _peaks_at_minimum(x, gen, out, k, **kw):
    """Forward and backward peaks over the plan's smallest feasible budget, first call and repeat."""
    from chunkconv import MemoryTracker

    minimum = chunkconv.plan(x, copy.deepcopy(gen), out, k, budget=2**40, training=True, **kw).minimum_budget
    ratios = []
    for _ in ("first", "repeat"):
        with MemoryTracker() as fwd:
            y = chunkconv.dynamic_conv(x, gen, out, k, budget=minimum, **kw)
        upstream = torch.randn_like(y)
        with MemoryTracker() as bwd:
            y.backward(upstream)
        ratios.append((fwd.peak / minimum, bwd.peak / minimum))
        del y, upstream
        for t in (x, kw.get("features"), *gen.parameters()):
            if t is not None:
                t.grad = None
    return ratios


def test_a_features_gradient_is_handed_back_in_the_features_layout():
    features = torch.randn(1, 64, 48, 48, requires_grad=True)
    ratios = _peaks_at_minimum(torch.randn(1, 1, 48, 48, requires_grad=True), nn.Linear(64, 9), 1, 3, padding=1,
                               inputs=("features",), features=features)  # fmt: skip
    assert all(r <= 1 for pair in ratios for r in pair), ratios


def test_an_unpadded_channels_last_input_gets_its_gradient_in_its_layout():
    x = torch.randn(1, 16, 48, 48).to(memory_format=torch.channels_last).requires_grad_()
    ratios = _peaks_at_minimum(x, nn.Linear(16, 256), 16, 1)
    assert all(r <= 1 for pair in ratios for r in pair), ratios
    y = chunkconv.dynamic_conv(x, nn.Linear(16, 256), 16, 1, budget=2**30)
    y.sum().backward()
    assert x.grad.stride() == x.stride()


def test_circular_padding_backward_stays_within_the_budget():
    x = torch.randn(1, 16, 64, 64, requires_grad=True)
    ratios = _peaks_at_minimum(x, nn.Linear(144, 144), 1, 3, padding=1, padding_mode="circular")
    assert all(r <= 1 for pair in ratios for r in pair), ratios


@pytest.mark.parametrize("padding", [(1, 2, 0), (2, 0, 1), (0, 0, 3), "same"])
def test_circular_padding_gradient_matches_torch(padding):
    from chunkconv.gather import circular_pad_backward
    from chunkconv.geometry import conv_spec

    x = torch.randn(2, 3, 4, 5, 6, dtype=F64, requires_grad=True)
    spec = conv_spec(3, in_channels=3, out_channels=3, kernel_size=(3, 5, 4), padding=padding, padding_mode="circular")
    geom = spec.geometry(tuple(x.shape))
    padded = torch.nn.functional.pad(x, geom.torch_pad, mode="circular")
    upstream = torch.randn_like(padded)
    (want,) = torch.autograd.grad(padded, x, upstream)
    torch.testing.assert_close(circular_pad_backward(upstream.clone(), geom), want, rtol=0, atol=1e-12)


# -- 8. the oracle takes every per-row shape the layer takes --------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_reference_takes_unflattened_modulation_shapes(per_channel):
    x = torch.randn(2, 3, 6, 5, dtype=F64)
    weight = torch.randn(4, 3, 3, 3, dtype=F64)
    lead = (3,) if per_channel else ()

    def gen(p):
        return torch.sigmoid(p[:, : 9 * (3 if per_channel else 1)]).reshape(p.shape[0], *lead, 3, 3)

    args = dict(kernel="modulated", weight=weight, padding=1)
    want = chunkconv.dynamic_conv2d(x, gen, 4, 3, chunk_size=7, **args)
    got = chunkconv.dynamic_conv_reference(x, gen, out_channels=4, kernel_size=3, **args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# -- 9. the plan's time estimate ------------------------------------------------------------------


class _Slow(nn.Module):
    """A generator whose time is per call, not per row: estimates from another chunk size are off."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(P, 3 * P)

    def forward(self, p):
        import time

        time.sleep(0.04)
        return self.lin(p)


def test_time_estimate_is_within_2x_of_the_measured_time():
    import time

    gen = _Slow()
    x = torch.randn(1, 2, 48, 48, requires_grad=True)  # 2,304 patches in 9 chunks of 256
    plan = chunkconv.plan(x, gen, 3, 3, padding=1, chunk_size=256)
    estimate = plan.estimated_seconds
    assert estimate is not None and estimate[1] is not None
    started = time.perf_counter()
    y = chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1, chunk_size=256)
    forward = time.perf_counter() - started
    started = time.perf_counter()
    y.sum().backward()
    backward = time.perf_counter() - started
    assert 0.5 <= estimate[0] / forward <= 2, (estimate, forward)
    assert 0.5 <= estimate[1] / backward <= 2, (estimate, backward)


# -- 10-16. clear errors, before any work -------------------------------------------------------


def test_a_generator_that_raises_is_named_with_its_inputs():
    gen = nn.Linear(32, 9)  # expects 32 features; the patches have 16
    with pytest.raises(chunkconv.GeneratorCallError, match=r"raised RuntimeError .* the patches \(2, 16\)") as info:
        chunkconv.dynamic_conv2d(torch.randn(1, 16, 5, 5), gen, 1, 1)
    assert isinstance(info.value.__cause__, RuntimeError) and "mat1 and mat2" in str(info.value.__cause__)


def test_a_generator_writing_into_its_input_is_refused_before_backward():
    lin = nn.Linear(P, 3 * P).to(F64)

    def gen(p):
        p.mul_(2)
        return lin(p)

    x = _x()
    with pytest.raises(GeneratorOutputError, match=r"modified its input 0 in place"):
        chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1, chunk_size=5)
    with torch.inference_mode():  # inference tensors keep no version counter: still runs
        chunkconv.dynamic_conv2d(torch.randn(1, 2, 6, 6, dtype=F64), lambda p: lin(p * 2), 3, 3, padding=1)


def test_inputs_as_a_bare_string_is_one_input():
    feats = torch.randn(1, 4, 6, 6)
    conv = chunkconv.DynamicConv2d(nn.Linear(4, 9), 1, 1, 3, padding=1, inputs="features")
    assert conv.inputs == ("features",)
    assert conv(torch.randn(1, 1, 6, 6), features=feats).shape == (1, 1, 6, 6)
    with pytest.raises(
        TypeError, match=r"^Invalid type for `inputs`; expected a kind or a tuple of kinds .* got NoneType"
    ):
        chunkconv.DynamicConv2d(nn.Linear(4, 9), 1, 1, 3, inputs=None)


@pytest.mark.parametrize("name, value", [("allow_batch_coupled", "no"), ("progress", 1), ("allow_batch_coupled", 1)])
def test_bool_options_take_bools_only(name, value):
    with pytest.raises(ValueError, match=rf"^Invalid value for `{name}`; expected .*True or False, got {name}="):
        chunkconv.DynamicConv2d(nn.Linear(9, 9), 1, 1, 3, **{name: value})


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_a_bias_of_another_dtype_is_refused(dtype):
    bias = torch.zeros(3, dtype=dtype)
    with pytest.raises(ValueError, match=rf"`bias` has dtype {dtype} but the input has dtype torch.float64"):
        chunkconv.dynamic_conv2d(_x(), _mlp(), 3, 3, bias, padding=1)


@pytest.mark.parametrize(
    "shape, error, match",
    [
        ((1, 2, -8, 8), ValueError, r"expected ints >= 0, got \(1, 2, -8, 8\)"),
        ((1, 2, 2.7, 8), ValueError, r"expected ints >= 0, got \(1, 2, 2.7, 8\)"),
    ],
)
def test_plan_refuses_shapes_that_are_not_sizes(shape, error, match):
    with pytest.raises(error, match=match):
        chunkconv.plan(shape, _mlp(), 3, 3, padding=1)


def test_plan_refuses_a_string_side_shape_and_a_non_bool_training():
    gen = nn.Linear(4, 9)
    with pytest.raises(TypeError, match=r"shape of `features` of plan; expected a tuple of ints, got '1x4x6x6'"):
        chunkconv.plan((1, 1, 6, 6), gen, 1, 3, padding=1, inputs=("features",), features="1x4x6x6")
    with pytest.raises(ValueError, match=r"^Invalid value for `training`; expected None, True or False"):
        chunkconv.plan((1, 1, 6, 6), gen, 1, 3, padding=1, training="yes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_planning_for_cuda_without_cuda_says_so():
    with pytest.raises(ValueError, match=r"^Invalid device cuda: CUDA is not available here"):
        chunkconv.plan((1, 2, 6, 6), _mlp(), 3, 3, padding=1, device="cuda")


def test_meta_tensors_are_refused_with_what_is_supported():
    with pytest.raises(ValueError, match=r"^Invalid device meta: .* pass the input's shape to chunkconv.plan"):
        chunkconv.dynamic_conv2d(torch.randn(1, 2, 6, 6, device="meta"), _mlp().to("meta"), 3, 3, padding=1)


def test_torch_func_and_forward_ad_are_refused_clearly():
    from torch.autograd import forward_ad

    gen = _mlp()
    x = torch.randn(1, 2, 6, 6, dtype=F64)

    def f(x):
        return chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1).sum()

    for transform in (lambda: torch.func.grad(f)(x), lambda: torch.func.vmap(f)(x.unsqueeze(0))):
        with pytest.raises(
            chunkconv.UnsupportedError, match=r"does not support torch.func transforms .* docs/training.md"
        ):
            transform()
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(chunkconv.UnsupportedError, match=r"does not support forward-mode AD"):
            f(dual)


def test_plans_of_empty_and_unbatched_inputs_read_right():
    gen = nn.Linear(16 * 9, 16 * 16 * 9)
    empty = str(chunkconv.plan((0, 16, 8, 8), gen, 16, 3, padding=1))
    assert "chunks   none (empty input: nothing to compute)" in empty, empty
    unbatched = str(chunkconv.plan((16, 8, 8), gen, 16, 3, padding=1))
    assert "input    (16, 8, 8) float32 on cpu -> output (16, 8, 8)" in unbatched, unbatched
    batched = str(chunkconv.plan((1, 16, 8, 8), gen, 16, 3, padding=1))  # not the unbatched plan from the cache
    assert "input    (1, 16, 8, 8) float32 on cpu -> output (1, 16, 8, 8)" in batched, batched


def test_cli_kernel_size_zero_is_refused_without_torchs_warning():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-W", "always", "-m", "chunkconv", "plan", "--input", "1x4x8x8", "--kernel-size", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "each kernel size must be >= 1" in done.stderr, done.stderr
    assert "zero-element" not in done.stderr, done.stderr


def test_compiling_with_fullgraph_says_the_graph_break_is_by_design():
    conv = chunkconv.DynamicConv2d(nn.Linear(18, 27), 2, 3, 3, padding=1)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"(?s)chunkconv: a graph break BY DESIGN .*compile without fullgraph=True"):
        torch.compile(conv, fullgraph=True, backend="eager")(torch.randn(1, 2, 6, 6))


# -- 21. getting started ---------------------------------------------------------------------------


def test_getting_started_says_how_to_install_the_cpu_build_of_torch():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "getting-started.md").read_text()
    assert "any build" not in text
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text
