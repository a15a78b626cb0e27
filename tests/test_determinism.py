"""Same inputs, seed and chunking give bit-identical results; nothing non-deterministic is used.

The generator is the user's: its matmuls go to the BLAS, whose results can
depend on the thread count (MKL's float64 GEMM does for some shapes). The
thread test therefore uses a BLAS-free generator, so that it checks what
chunkconv itself computes: the gather, the contraction, the scatter, the
padding's backward and the sums over chunks.
"""

import copy

import pytest
import torch
from torch import nn

import chunkconv
from chunkconv.geometry import PADDING_MODES, conv_spec
from chunkconv.testing import mlp_generator

SPEC = conv_spec(2, in_channels=4, out_channels=8, kernel_size=3, padding=1)


class Elementwise(nn.Module):
    """A generator with parameters but no matmul: ``tanh(repeat(patch) * scale + shift)``."""

    def __init__(self, patch: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.scale = nn.Parameter(torch.randn(out_channels * patch))
        self.shift = nn.Parameter(torch.randn(out_channels * patch))

    def forward(self, patches):
        return torch.tanh(patches.repeat(1, self.out_channels) * self.scale + self.shift)


def _run(
    gen,
    dtype=torch.float64,
    chunk_size=37,
    padding_mode="zeros",
    size=12,
    seed=0,
    device="cpu",
    path="auto",
    budget="auto",
):
    """Output and every gradient of one seeded call, as a list of tensors."""
    torch.manual_seed(seed)
    gen = gen.to(device, dtype)
    x = torch.randn(2, 4, size, size, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(8, dtype=dtype, device=device, requires_grad=True)
    y = chunkconv.dynamic_conv2d(
        x, gen, 8, 3, bias, padding=1, padding_mode=padding_mode, chunk_size=chunk_size, path=path, budget=budget
    )
    grads = torch.autograd.grad(y, [x, bias, *gen.parameters()], torch.randn_like(y))
    return [y, *grads]


def _assert_identical(a, b):
    assert len(a) == len(b)
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), f"tensor {i} differs: max abs diff {(p - q).abs().max().item():.3e}"


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("chunk_size", [7, None])
def test_repeated_runs_are_bit_identical(chunk_size):
    # dropout before the last Linear: the fast path (the default here) runs it in the generator's body
    gen = nn.Sequential(nn.Linear(36, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 8 * 36))
    first = _run(gen, chunk_size=chunk_size, seed=3, size=8)
    second = _run(gen, chunk_size=chunk_size, seed=3, size=8)
    _assert_identical(first, second)
    other_seed = _run(gen, chunk_size=chunk_size, seed=4, size=8)  # the seed does matter (dropout)
    assert not torch.equal(first[0], other_seed[0])


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_same_budget_gives_the_same_plan_and_bit_identical_results(path):
    # each run measures a fresh copy of the generator, so the plan is made anew from the budget
    gen = nn.Sequential(nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, 8 * 36)).double()
    probe = chunkconv.DynamicConv(copy.deepcopy(gen), 4, 8, 3, padding=1, budget=2**40, path=path, dtype=torch.float64)
    budget = int(1.5 * probe.plan((2, 4, 8, 8)).minimum_budget)
    plans = [
        chunkconv.DynamicConv(copy.deepcopy(gen), 4, 8, 3, padding=1, budget=budget, path=path, dtype=torch.float64)
        .plan((2, 4, 8, 8))
        .chunk_size
        for _ in range(2)
    ]
    assert plans[0] == plans[1] and plans[0] < 128  # many chunks of the 128 patches
    first = _run(copy.deepcopy(gen), chunk_size=None, size=8, path=path, budget=budget)
    second = _run(copy.deepcopy(gen), chunk_size=None, size=8, path=path, budget=budget)
    _assert_identical(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_thread_count_does_not_change_chunkconvs_arithmetic(restore_threads, dtype, padding_mode):
    torch.manual_seed(0)
    gen = Elementwise(36, 8)
    torch.set_num_threads(1)
    one = _run(gen, dtype=dtype, padding_mode=padding_mode, size=20)
    torch.set_num_threads(2)
    two = _run(gen, dtype=dtype, padding_mode=padding_mode, size=20)
    _assert_identical(one, two)


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_deterministic_algorithms_mode_runs_and_changes_nothing(padding_mode, path):
    gen = mlp_generator(SPEC, hidden=8)
    free = _run(gen, padding_mode=padding_mode, size=6, path=path)
    torch.use_deterministic_algorithms(True)
    try:
        strict = _run(gen, padding_mode=padding_mode, size=6, path=path)
    finally:
        torch.use_deterministic_algorithms(False)
    _assert_identical(free, strict)


@pytest.mark.cuda
def test_cuda_repeated_runs_are_bit_identical_in_deterministic_mode():
    # zero padding only: torch has no deterministic CUDA backward for reflect/replicate padding,
    # so those raise under this mode exactly as nn.Conv2d with the same padding_mode does
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # cuBLAS needs CUBLAS_WORKSPACE_CONFIG set up front
    try:
        gen = mlp_generator(SPEC, hidden=16, dtype=torch.float32)
        first = _run(gen, dtype=torch.float32, size=32, device="cuda")
        second = _run(gen, dtype=torch.float32, size=32, device="cuda")
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    _assert_identical(first, second)
