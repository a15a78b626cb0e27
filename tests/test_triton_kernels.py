"""The fused Triton kernels, against the unchunked oracle.

Without a GPU they run in Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before Triton is first imported: ``test_kernels_under_the_interpreter`` runs this module again in
a subprocess with it set, where the ``interp`` tests run on CPU tensors with tiny shapes. The
``cuda`` tests run the same checks on a GPU when there is one (in this process, compiled).
Triton 3.9's interpreter gets ``tl.dot`` on bfloat16 wrong, so bfloat16 is checked on CUDA only.
"""

import contextlib
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import chunkconv
from chunkconv.fast import choose_path
from chunkconv.fast.kernels import triton_unavailable
from chunkconv.geometry import conv_spec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
interp = pytest.mark.skipif(not INTERPRET, reason="runs in test_kernels_under_the_interpreter's subprocess")
cuda = pytest.mark.cuda
compiled = pytest.mark.skipif(INTERPRET, reason="compiled kernels only")

# (groups, in_channels, out_channels, hidden, kernel, rows): HP = 8, 16, 64; rows not a tile multiple;
# depthwise (one output per group) and 1x1 grouped with one patch feature per group, where the
# bias term's einsum comes back with a transposed layout
SHAPES = [(1, 3, 4, 5, 3, 37), (2, 4, 6, 16, 2, 21), (1, 2, 3, 40, 3, 17), (3, 3, 3, 4, 3, 19), (2, 2, 4, 6, 1, 23)]
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 1e-1),
}


def test_kernels_under_the_interpreter():
    if INTERPRET:
        pytest.skip("already interpreting")
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "interp", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def _check_contract(device, dtype, shape, bias, tol=None):
    from chunkconv.fast.kernels.contract import TritonContract

    g, c, o, hidden, k, rows = shape
    geom = conv_spec(2, in_channels=c, out_channels=o, kernel_size=k, groups=g).geometry((1, c, 6, 6))
    pg = geom.patch_size // g
    make = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    ref_in = [make(rows, geom.patch_size), make(rows, hidden), make(o * pg, hidden), make(o * pg) if bias else None]
    ref_in = [t.requires_grad_() if t is not None else None for t in ref_in]
    got_in = [t.detach().to(device, dtype).requires_grad_() if t is not None else None for t in ref_in]
    x, h, w, b = ref_in
    weights = torch.nn.functional.linear(h, w, b).view(rows, g, o // g, pg)
    want = torch.einsum("bgop,bgp->bgo", weights, x.view(rows, g, pg)).reshape(rows, o)
    got = TritonContract.apply(*got_in, geom)
    rtol, atol = tol or TOL[dtype]
    assert got.dtype == dtype and got.device.type == torch.device(device).type
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=rtol, atol=atol * want.abs().max().item())
    upstream = torch.randn_like(want)
    leaves_ref = [t for t in ref_in if t is not None]
    leaves_got = [t for t in got_in if t is not None]
    grads_want = torch.autograd.grad(want, leaves_ref, upstream)
    grads_got = torch.autograd.grad(got, leaves_got, upstream.to(device, dtype))
    for name, a, e in zip("xhWc", grads_got, grads_want):
        assert a.dtype == dtype, name
        scale = e.abs().max().item()
        torch.testing.assert_close(
            a.double().cpu(), e, rtol=rtol, atol=atol * scale, msg=lambda m, name=name: f"grad {name}: {m}"
        )


def _check_conv(device, dtype, kind, groups):
    """A whole dynamic_conv on the fast path with the Triton backend, vs the reference."""
    c, o, k = 2 * groups, 2 * groups, 3
    p, wsize = c * k * k, o * (c // groups) * k * k
    if kind == "linear":
        gen = nn.Linear(p, wsize)
    else:
        gen = nn.Sequential(nn.Linear(p, 6), nn.Tanh(), nn.Linear(6, wsize))
    gen = gen.to(device, dtype)
    x = torch.randn(2, c, 5, 4, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(o, dtype=dtype, device=device, requires_grad=True)
    geom = conv_spec(2, in_channels=c, out_channels=o, kernel_size=k, groups=groups, padding=1).geometry(x.shape)
    choice = choose_path(gen, geom, dtype, device=x.device)
    assert choice.path == "fast" and choice.backend == "triton", str(choice)
    y = chunkconv.dynamic_conv2d(x, gen, o, k, bias=bias, padding=1, groups=groups, chunk_size=13)
    leaves = [x, bias, *gen.parameters()]
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, upstream)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves[:2]]
    ref_gen = copy.deepcopy(gen).double().cpu()
    want = chunkconv.dynamic_conv_reference(
        ref_leaves[0], ref_gen, out_channels=o, kernel_size=k, bias=ref_leaves[1], padding=1, groups=groups
    )
    want_grads = torch.autograd.grad(
        want, [ref_leaves[0], ref_leaves[1], *ref_gen.parameters()], upstream.double().cpu()
    )
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double().cpu(), want.detach(), rtol=rtol, atol=atol * want.abs().max().item())
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a.double().cpu(), e, rtol=rtol, atol=atol * e.abs().max().item())


@interp
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_interp_contract_float64(shape, bias):
    _check_contract("cpu", torch.float64, shape, bias)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_contract_low_precision(dtype):
    _check_contract("cpu", dtype, SHAPES[1], True)


@interp
@pytest.mark.parametrize("kind, groups", [("mlp", 1), ("mlp", 2), ("linear", 1)])
def test_interp_dynamic_conv_uses_the_kernels(kind, groups):
    _check_conv("cpu", torch.float64, kind, groups)


@interp
def test_interp_long_chunks_launch_in_blocks(monkeypatch):
    # offsets are 32-bit in the kernels: a chunk past 2**31 elements runs as several launches
    from chunkconv.fast.kernels import contract

    monkeypatch.setattr(contract, "MAX_LAUNCH_ELEMENTS", 7 * 40)  # h is (17, 40): blocks of 7 rows
    blocks = contract._row_blocks(torch.zeros(17, 18), torch.zeros(17, 40), torch.zeros(17, 3))
    assert [(r.start, r.stop) for r in blocks] == [(0, 7), (7, 14), (14, 17)]
    _check_contract("cpu", torch.float64, (1, 2, 3, 40, 3, 17), True)  # all four kernels, three launches each


class _TriesConfigs:
    """Stands in for ``triton.autotune`` under the interpreter: launches each tile height in turn on
    the same arguments, as the autotuner's benchmark does, the last one being the "winner"."""

    def __init__(self, kernel, heights):
        self.kernel, self.heights = kernel, heights

    def __getitem__(self, grid):
        def launch(*args, **meta):
            for bb in self.heights:
                m = {**meta, "BB": bb}
                self.kernel[grid(m) if callable(grid) else grid](*args, **m)

        return launch


@interp
def test_interp_weight_gradient_survives_autotuning(monkeypatch):
    # 16-row tiles spread 40 rows over both slices of the partial sums, 64-row tiles over one: the
    # grid must not depend on the tile height, or the winner leaves the loser's slice to be summed
    from chunkconv.fast.kernels import contract

    monkeypatch.setattr(contract, "_bwd_w", _TriesConfigs(contract._bwd_w, (16, 64)))
    _check_contract("cpu", torch.float64, (1, 2, 3, 5, 3, 40), True)


@interp
def test_interp_empty_chunk():
    from chunkconv.fast.kernels.contract import contract_backward, contract_forward

    geom = conv_spec(1, in_channels=2, out_channels=2, kernel_size=3).geometry((1, 2, 5))
    x, h, w = torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64), torch.ones(12, 4)
    assert contract_forward(x, h, w.double(), None, geom).shape == (0, 2)
    gx, gh, gw, gc = contract_backward(torch.zeros(0, 2).double(), x, h, w.double(), None, geom, (True,) * 4)
    assert gx.shape == x.shape and gh.shape == h.shape and gw.abs().sum() == 0 and gc is None


@compiled
@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_gpus_older_than_ampere_fall_back(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    reason = triton_unavailable(torch.device("cuda", 0), torch.float16)
    assert reason == "the GPU's compute capability is 7.5, and the kernels need 8.0 (Ampere) or newer"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert triton_unavailable(torch.device("cuda", 0), torch.bfloat16) is None


def test_fallback_reasons():
    cpu, f32 = torch.device("cpu"), torch.float32
    if not INTERPRET:
        assert "on cpu" in triton_unavailable(cpu, f32)
    assert "float64" in (triton_unavailable(torch.device("cuda"), torch.float64) or "")
    assert "in_features=300" in (triton_unavailable(torch.device("cuda"), f32, hidden=300) or "")
    old = os.environ.get("CHUNKCONV_TRITON")
    os.environ["CHUNKCONV_TRITON"] = "0"
    try:
        assert triton_unavailable(torch.device("cuda"), f32) == "turned off by CHUNKCONV_TRITON=0"
    finally:
        os.environ.pop("CHUNKCONV_TRITON") if old is None else os.environ.__setitem__("CHUNKCONV_TRITON", old)


@cuda
@compiled
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_contract(shape, dtype):
    with _tf32(False):
        _check_contract("cuda", dtype, shape, True)


@cuda
@compiled
def test_cuda_contract_tf32():
    with _tf32(True):
        _check_contract("cuda", torch.float32, SHAPES[0], True, tol=TOL[torch.float16])  # TF32: fp16's mantissa


@cuda
@compiled
def test_cuda_autotuning_stays_inside_the_budget(monkeypatch, tmp_path):
    # Triton's default benchmark allocates 256 MB to flush L2: ours allocates nothing, and tunes
    # per power of two of the chunk length, so a planner probe of 2 rows does not pick the tiles
    from chunkconv.fast.kernels import contract

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # tune now, not from an earlier run's cache
    geom = conv_spec(2, in_channels=3, out_channels=5, kernel_size=3).geometry((1, 3, 8, 8))  # a key no other test uses
    w = torch.randn(5 * 27, 7, device="cuda")
    for rows in (2, 5000):
        x, h = torch.randn(rows, 27, device="cuda"), torch.randn(rows, 7, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        contract._fwd.configs_timings = None  # set again only if this call benchmarks configs
        y = contract.contract_forward(x, h, w, None, geom)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base <= y.numel() * 4 + 2**20
        assert len(contract._fwd.configs_timings or ()) > 1  # it did benchmark configs, for this key
    buckets = {k[3] for k in contract._fwd.cache if k[:3] == (27, 7, 5)}
    assert buckets == {contract.rows_bucket(2), contract.rows_bucket(5000)}


def test_rows_bucket():
    pytest.importorskip("triton")
    from chunkconv.fast.kernels.contract import rows_bucket

    assert [rows_bucket(n) for n in (1, 2, 3, 4, 5, 1024, 1025, 2**17, 2**30)] == [1, 1, 2, 2, 3, 10, 11, 17, 17]


@cuda
@compiled
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_kernels_run_on_the_tensors_device():
    with torch.cuda.device(0):  # Triton launches on the current device unless told otherwise
        _check_contract("cuda:1", torch.float32, SHAPES[0], True)


@cuda
@compiled
def test_cuda_gradients_while_autotuning(monkeypatch, tmp_path):
    # thousands of rows: the weight gradient's grid has several slices and the autotuner tries
    # configs of different tile heights on the same buffers before the result is kept
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with _tf32(False):
        _check_contract("cuda", torch.float32, (2, 4, 6, 16, 2, 5003), True)


@contextlib.contextmanager
def _tf32(enabled):
    from benchmarks.measure import set_tf32
    from chunkconv.fast.kernels import tf32_allowed

    old = tf32_allowed()
    set_tf32(enabled)
    try:
        yield
    finally:
        set_tf32(old)


_TF32_SCRIPT = """
import torch
from chunkconv.fast.kernels import tf32_allowed
m = torch.backends.cuda.matmul
seen = [tf32_allowed()]
torch.set_float32_matmul_precision("high"); seen.append(tf32_allowed())      # legacy API
m.allow_tf32 = False; seen.append(tf32_allowed())                            # legacy API
m.fp32_precision = "tf32"; seen.append(tf32_allowed())                       # new API: allow_tf32 now raises
m.fp32_precision = "ieee"; torch.backends.fp32_precision = "tf32"; seen.append(tf32_allowed())
print(seen)
"""


def test_tf32_follows_torchs_flags_old_and_new():
    # process-wide flags, and mixing the APIs makes torch raise on reads: a fresh process
    done = subprocess.run([sys.executable, "-c", _TF32_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[False, True, False, True, False]"


@cuda
@compiled
@pytest.mark.parametrize("kind, groups", [("mlp", 1), ("mlp", 2), ("linear", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dynamic_conv_uses_the_kernels(kind, groups, dtype):
    _check_conv("cuda", dtype, kind, groups)


@pytest.mark.slow
@compiled
@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_the_gpu(arch):
    """Lower every kernel to a cubin for H100 (sm_90) and A100 (sm_80) with Triton's bundled ptxas,
    no GPU needed: catches what the interpreter cannot (layouts of the reshaped accumulators,
    operand shapes of tensor-core dots, shared memory). ``benchmarks/kernel_compile.py`` does this
    for every autotuned config and prints registers, spills and shared memory."""
    from benchmarks.kernel_compile import compiler_available, jobs_for, run_job

    if why := compiler_available():
        pytest.skip(why)
    jobs = jobs_for([arch], ["B"], ["bfloat16", "tf32", "float32"], every_config=False)
    results = [run_job(job) for job in jobs]
    assert len(results) == 12
    problems = [f"{r.job.kernel} {r.job.dtype}: {p}" for r in results for p in r.problems]
    assert not problems, problems
    assert all(r.tensor_op != "none" for r in results if r.job.dtype != "float32")  # bf16, TF32: tensor cores
    if arch == 90:  # the autotuner's 64-row tiles reach Hopper's warpgroup MMA
        wide = next(j for j in jobs_for([90], ["B"], ["bfloat16"], ["fwd"]) if j.config["BB"] >= 64)
        assert run_job(wide).tensor_op == "wgmma"
