"""The planner's promise: measured peak <= budget, forward and backward, and a plan before any work."""

import math
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import chunkconv
from chunkconv import MemoryTracker
from chunkconv.geometry import conv_spec
from chunkconv.planner import SAFETY_FACTOR, safety_bytes
from chunkconv.testing import ConvCase, conv_cases, mlp_generator

# The estimate is an upper bound of the measured peak; this is how loose it may be (documented in
# docs/memory.md): estimate <= ESTIMATE_FACTOR * measured + ESTIMATE_SLACK.
ESTIMATE_FACTOR = 2.0
ESTIMATE_SLACK = 256 * 1024


def _conv(case: ConvCase, gen, budget, dtype):
    s = case.spec
    return chunkconv.DynamicConv(
        gen,
        s.in_channels,
        s.out_channels,
        s.kernel_size,
        stride=s.stride,
        padding=s.padding,
        dilation=s.dilation,
        groups=s.groups,
        bias=case.bias,
        padding_mode=s.padding_mode,
        budget=budget,
        dtype=dtype,
    )


@settings(max_examples=25)
@given(
    case=conv_cases(ndims=(1, 2), allow_empty=False, max_batch=2),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    hidden=st.integers(2, 24),
    data=st.data(),
)
def test_measured_peak_within_budget_forward_and_backward(case, dtype, hidden, data):
    gen = mlp_generator(case.spec, hidden=hidden, dtype=dtype)
    x = torch.randn(case.input_shape, dtype=dtype, requires_grad=True)
    probe = _conv(case, gen, 2**40, dtype)
    plan = probe.plan(x)
    minimum = plan.minimum_budget
    budget = data.draw(st.integers(minimum, max(minimum, 2 * minimum)), label="budget")
    conv = _conv(case, gen, budget, dtype)
    plan = conv.plan(x)
    with MemoryTracker() as fwd:
        y = conv(x)
    upstream = torch.randn_like(y)
    with MemoryTracker() as bwd:
        y.backward(upstream)
    assert fwd.peak <= budget, (plan, fwd)
    assert bwd.peak <= budget, (plan, bwd)
    assert plan.forward_peak <= ESTIMATE_FACTOR * fwd.peak + ESTIMATE_SLACK, (plan, fwd)
    assert plan.backward_peak <= ESTIMATE_FACTOR * bwd.peak + ESTIMATE_SLACK, (plan, bwd)


@pytest.mark.parametrize("training", [False, True])
def test_one_byte_below_the_smallest_budget_raises_and_the_smallest_runs(training):
    spec = conv_spec(2, in_channels=3, out_channels=4, kernel_size=3, padding=1)
    gen = mlp_generator(spec, hidden=16, dtype=torch.float32)
    x = torch.randn(2, 3, 20, 24, requires_grad=training)
    minimum = chunkconv.plan(x, gen, 4, 3, padding=1, budget=2**40, training=training).minimum_budget
    with pytest.raises(
        chunkconv.BudgetTooSmallError, match=rf"the smallest budget that fits is .* \({minimum} bytes\)"
    ) as info:
        chunkconv.plan(x, gen, 4, 3, padding=1, budget=minimum - 1, training=training)
    assert info.value.minimum == minimum and info.value.budget == minimum - 1
    mode = torch.enable_grad() if training else torch.no_grad()
    with mode, pytest.raises(chunkconv.BudgetTooSmallError):
        chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, budget=minimum - 1)
    plan = chunkconv.plan(x, gen, 4, 3, padding=1, budget=minimum, training=training)
    assert plan.chunk_size == 1
    with mode, MemoryTracker() as fwd:
        y = chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, budget=minimum)
    assert fwd.peak <= minimum
    if training:
        with MemoryTracker() as bwd:
            y.sum().backward()
        assert bwd.peak <= minimum


def test_budget_too_small_is_raised_before_any_work():
    calls = []
    spec = conv_spec(2, in_channels=3, out_channels=4, kernel_size=3)
    inner = mlp_generator(spec, dtype=torch.float32)

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, p):
            calls.append(p.shape[0])
            return self.inner(p)

    gen = Counting()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(chunkconv.BudgetTooSmallError, match=r"inspect the costs with `conv.plan\(x\)`"):
        chunkconv.dynamic_conv2d(x, gen, 4, 3, budget="1kB")
    assert all(n in chunkconv.measure.PROBE_ROWS["cpu"] for n in calls)  # only the planner's probes ran


@given(budgets=st.lists(st.integers(50_000, 50_000_000), min_size=2, max_size=6))
def test_larger_budget_never_means_more_chunks(budgets):
    spec = conv_spec(2, in_channels=2, out_channels=3, kernel_size=3, padding=1)
    gen = mlp_generator(spec, hidden=8, dtype=torch.float32)
    chunks = []
    for budget in sorted(budgets):
        try:
            chunks.append(chunkconv.plan((3, 2, 40, 50), gen, 3, 3, padding=1, budget=budget).num_chunks)
        except chunkconv.BudgetTooSmallError:
            chunks.append(math.inf)
    assert chunks == sorted(chunks, reverse=True)


def test_plan_is_printable_frozen_and_cached():
    spec = conv_spec(2, in_channels=16, out_channels=16, kernel_size=3, padding=1)
    gen = mlp_generator(spec, hidden=32, dtype=torch.float32, activation=nn.ReLU)
    conv = chunkconv.DynamicConv(gen, 16, 16, 3, padding=1, budget="64MB")
    plan = conv.plan((2, 16, 128, 128))
    assert plan is conv.plan((2, 16, 128, 128))
    with pytest.raises(AttributeError):
        plan.chunk_size = 3
    text = str(plan)
    for needle in ("chunks", "budget", "peak", "unchunked", "smallest feasible budget", "per chunk"):
        assert needle in text
    assert plan.budget == 64_000_000
    assert SAFETY_FACTOR * max(plan.forward_peak, plan.backward_peak) + safety_bytes(plan.device) <= plan.budget
    assert plan.unchunked_training > plan.budget
    assert plan.num_chunks == math.ceil(2 * 128 * 128 / plan.chunk_size)


def test_planning_changes_nothing_the_user_owns():
    gen = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 12))
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    rng = torch.get_rng_state()
    chunkconv.plan((2, 2, 30), gen, 2, (3,), budget="1GB", allow_batch_coupled=True)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in gen.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in gen.parameters())


def test_auto_and_fraction_budgets():
    spec = conv_spec(2, in_channels=2, out_channels=2, kernel_size=3, padding=1)
    gen = mlp_generator(spec, dtype=torch.float32)
    x = torch.randn(1, 2, 16, 16)
    for budget in ("auto", 0.25, None):
        plan = chunkconv.plan(x, gen, 2, 3, padding=1, budget=budget)
        assert plan.num_chunks == 1 and plan.budget > 0
    with pytest.raises(ValueError, match=r"4 parsecs"):
        chunkconv.DynamicConv(gen, 2, 2, 3, budget="4 parsecs")


def test_chunk_size_overrides_the_budget():
    spec = conv_spec(2, in_channels=2, out_channels=2, kernel_size=3, padding=1)
    gen = mlp_generator(spec, dtype=torch.float32)
    plan = chunkconv.plan((1, 2, 16, 16), gen, 2, 3, padding=1, budget="1kB", chunk_size=10)
    assert plan.chunk_size == 10 and plan.num_chunks == 26 and plan.reason == "chunk_size given"


class _OOMAbove(nn.Module):
    """A deterministic generator that fails like a full GPU on more than `limit` patches."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.armed = inner, limit, False

    def forward(self, patches):
        if self.armed and patches.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(patches)


def test_out_of_memory_mid_call_halves_the_chunk_and_gives_the_same_result():
    spec = conv_spec(2, in_channels=2, out_channels=3, kernel_size=3, padding=1)
    gen = _OOMAbove(mlp_generator(spec), limit=7)
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    want = chunkconv.dynamic_conv_reference(x, gen, out_channels=3, kernel_size=3, padding=1)
    want_grads = torch.autograd.grad(want.sum(), [x, *gen.parameters()])
    gen.armed = True
    chunkconv.execute._oom_warned = False
    with pytest.warns(RuntimeWarning, match="out of memory") as record:
        y = chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1, chunk_size=25)
        grads = torch.autograd.grad(y.sum(), [x, *gen.parameters()])
    assert len([w for w in record if "out of memory" in str(w.message)]) == 1
    torch.testing.assert_close(y, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_out_of_memory_in_backward_with_random_generator_is_not_split():
    # frozen: a lambda over a module with trainable parameters is refused (they would not train)
    gen = nn.Sequential(nn.Linear(18, 4), nn.Dropout(0.3), nn.Linear(4, 54)).double().requires_grad_(False)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    y = chunkconv.dynamic_conv2d(x, lambda p: gen(p), 3, 3, padding=1, chunk_size=30)

    def fail(module, args):
        if args[0].shape[0] > 8:
            raise torch.OutOfMemoryError("simulated")

    gen[0].register_forward_pre_hook(fail)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(torch.OutOfMemoryError):
            y.sum().backward()


def test_command_line_plan():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "chunkconv",
            "plan",
            "--input",
            "1x16x2048x2048",
            "--out-channels",
            "16",
            "--kernel-size",
            "3",
            "--padding",
            "1",
            "--hidden",
            "32",
            "--budget",
            "4GB",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "chunkconv plan" in out and "unchunked" in out and "budget   3.73 GiB" in out
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "chunkconv",
            "plan",
            "--input",
            "1x16x64x64",
            "--out-channels",
            "16",
            "--kernel-size",
            "3",
            "--budget",
            "10kB",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Rerun with --budget" in bad.stderr  # advice in CLI terms (issue 12)


def test_plan_cache_follows_changes_to_the_generator():
    spec = conv_spec(2, in_channels=4, out_channels=4, kernel_size=3, padding=1)
    gen = nn.Sequential(nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 144))
    x = torch.randn(1, 4, 64, 64)
    first = chunkconv.plan(x, gen, 4, 3, padding=1, budget="16MB")
    gen[0], gen[2] = nn.Linear(36, 2048), nn.Linear(2048, 144)  # same types, much wider
    second = chunkconv.plan(x, gen, 4, 3, padding=1, budget="16MB")
    assert second is not first and second.chunk_size < first.chunk_size
    with MemoryTracker() as fwd:
        y = chunkconv.dynamic_conv2d(x, gen, 4, 3, padding=1, budget="16MB")
    with MemoryTracker() as bwd:
        y.sum().backward()
    assert fwd.peak <= 16_000_000 and bwd.peak <= 16_000_000
    del spec


def test_first_call_including_its_probes_stays_within_the_budget():
    # few patches, huge per-patch weights: probing must not outgrow the call it plans for
    gen = nn.Sequential(nn.Linear(576, 16), nn.ReLU(), nn.Linear(16, 64 * 576))
    x = torch.randn(1, 64, 16, 16)
    for path in ("fast", "generic"):
        with torch.no_grad(), MemoryTracker() as tracker:
            chunkconv.dynamic_conv2d(x, gen, 64, 3, padding=1, budget="40MB", path=path)
        assert tracker.peak <= 40_000_000, (path, tracker.peak)


def test_malformed_budget_is_refused_before_the_generator_runs():
    calls = []
    gen = nn.Linear(6, 6)
    gen.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    x = torch.randn(1, 2, 20)
    for bad in ("4 gigs", 1.5):
        with pytest.raises(ValueError, match="budget"):
            chunkconv.dynamic_conv1d(x, gen, 1, 3, budget=bad)
    assert calls == []


def test_forward_retry_after_out_of_memory_replays_the_same_random_numbers():
    drawn = []

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(18, 54).double()
            self.fail_once = True

        def forward(self, p):
            noise = torch.rand(p.shape[0], 54, dtype=p.dtype)
            drawn.append(noise)
            if self.fail_once and p.shape[0] > 8:
                self.fail_once = False
                raise torch.OutOfMemoryError("simulated")
            return self.inner(p) * noise

    gen = Noisy()
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    chunkconv.execute._oom_warned = False
    with pytest.warns(RuntimeWarning, match="out of memory"):
        y = chunkconv.dynamic_conv2d(x, gen, 3, 3, padding=1, chunk_size=16, path="generic")
    forward_draws = drawn[2:]  # the generator check's probe draw, and the failed attempt's (rolled back)
    drawn.clear()
    y.sum().backward()
    assert len(drawn) == len(forward_draws)
    for a, b in zip(forward_draws, drawn):
        assert torch.equal(a, b)


def test_cuda_training_plans_count_the_backward_threads_cublas_workspace():
    # autograd's CUDA thread gets its own cuBLAS workspace, which the probes (on this thread) miss
    from chunkconv.planner import CUDA_BACKWARD_WORKSPACE, PlanRequest, fixed_costs

    geom = conv_spec(2, in_channels=2, out_channels=3, kernel_size=3, padding=1).geometry((1, 2, 8, 8))
    costs = {
        kind: fixed_costs(
            PlanRequest(geom, torch.float32, torch.float32, torch.device(kind), True, True, param_bytes=1000)
        )
        for kind in ("cpu", "cuda")
    }
    assert costs["cuda"][0] == costs["cpu"][0]  # forward: no autograd thread
    assert sum(costs["cuda"][1].values()) - sum(costs["cpu"][1].values()) == CUDA_BACKWARD_WORKSPACE


def test_generator_is_measured_once_for_every_shape_batch_size_and_mode(monkeypatch):
    # first-call cost: a new batch size, eval() on an MLP and no_grad inference reuse the
    # first measurement instead of probing again (before: 4, 8 and 8 more probe runs)
    calls = []
    measure = chunkconv.measure.measure_step_cost
    monkeypatch.setattr(chunkconv.measure, "measure_step_cost", lambda *a, **k: calls.append(1) or measure(*a, **k))
    gen = nn.Sequential(nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 4 * 36))
    conv = chunkconv.DynamicConv2d(gen, 4, 4, 3, padding=1)
    conv(torch.randn(1, 4, 48, 48, requires_grad=True)).sum().backward()
    assert len(calls) == 1
    conv(torch.randn(3, 4, 40, 56, requires_grad=True)).sum().backward()  # new shape and batch size
    conv.eval()
    conv(torch.randn(1, 4, 48, 48, requires_grad=True)).sum().backward()  # eval() of a mode-free MLP
    with torch.no_grad():
        conv(torch.randn(2, 4, 48, 48))  # inference: forward's measurement is the training one's
    assert len(calls) == 1
    gen.insert(1, nn.Dropout(0.1))  # a module that reads the mode: its mode counts
    gen.train()
    conv(torch.randn(1, 4, 48, 48, requires_grad=True)).sum().backward()
    gen.eval()
    conv(torch.randn(1, 4, 48, 48, requires_grad=True)).sum().backward()
    assert len(calls) == 3
    assert "reused for other input sizes" in str(conv.plan((1, 4, 48, 48)))
