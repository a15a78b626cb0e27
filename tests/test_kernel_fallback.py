"""The fused kernels never take a user down: a Triton failure at run time falls back to PyTorch.

Failures are injected at each stage (importing Triton, compiling, launching, the autotuner's
benchmark, a backward kernel); each run must give the output and gradients of the same call
without the injection, warn exactly once, and try the failing stage only once however many chunks
follow. The kernels run in Triton's interpreter, switched on before Triton is imported: as in
``test_triton_kernels.py``, ``test_fallback_under_the_interpreter`` runs this module again in a
subprocess with ``TRITON_INTERPRET=1``, where the ``interp`` tests run on CPU tensors.
"""

import copy
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chunkconv
import chunkconv.execute
from chunkconv.fast import choose_path
from chunkconv.fast.kernels import fallback, triton_contract
from chunkconv.geometry import conv_spec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
interp = pytest.mark.skipif(not INTERPRET, reason="runs in test_fallback_under_the_interpreter's subprocess")
OURS = "chunkconv: the fused Triton kernels failed"


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.setattr(fallback, "_failed", {})
    monkeypatch.setattr(fallback, "_warned", set())


def test_fallback_under_the_interpreter():
    if INTERPRET:
        pytest.skip("already interpreting")
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "interp", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def _ours(caught):
    return [w for w in caught if issubclass(w.category, RuntimeWarning) and str(w.message).startswith(OURS)]


def _operands(groups, in_channels, out_channels, hidden, k, rows, bias=True):
    geom = conv_spec(2, in_channels=in_channels, out_channels=out_channels, kernel_size=k, groups=groups).geometry(
        (1, in_channels, 6, 6)
    )
    pg = geom.patch_size // groups
    make = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    c = make(out_channels * pg) if bias else None
    return (make(rows, geom.patch_size), make(rows, hidden), make(out_channels * pg, hidden), c), geom


def _recipe(x, h, w, c, geom):
    """The contraction the kernels compute, written as the forum recipe would."""
    g, rows = geom.groups, x.shape[0]
    weights = F.linear(h, w, c).view(rows, g, geom.out_channels // g, geom.patch_size // g)
    return torch.einsum("bgop,bgp->bgo", weights, x.view(rows, g, -1)).reshape(rows, geom.out_channels)


# hidden >= patch features per group (per-patch weights) and hidden < them (T = x W first); groups
@pytest.mark.parametrize("shape", [(1, 3, 4, 40, 3, 17), (1, 3, 4, 5, 3, 17), (2, 4, 6, 3, 2, 11), (2, 2, 4, 6, 1, 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_pytorch_contraction_matches_the_kernels_formula(shape, bias):
    operands, geom = _operands(*shape, bias=bias)
    leaves = [t for t in operands if t is not None]
    want = _recipe(*operands, geom)
    got = fallback.torch_contract(*operands, geom)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves, gy)
    got_grads = fallback.torch_contract_backward(gy, *operands, geom, (True, True, True, True))
    for a, e in zip([g for g in got_grads if g is not None], want_grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    some = fallback.torch_contract_backward(gy, *operands, geom, (False, True, False, False))
    assert some[0] is None and some[2] is None and some[3] is None
    torch.testing.assert_close(some[1], want_grads[1])


def test_import_failure_falls_back_and_warns_once(monkeypatch):
    # a broken Triton install: importing the kernels raises; no kernel is needed to check this
    import chunkconv.fast.kernels

    def broken():
        raise ImportError("libtriton.so: undefined symbol: _ZN4mlir (injected)")

    monkeypatch.setattr(chunkconv.fast.kernels, "_import_contract", broken)
    operands, geom = _operands(1, 3, 4, 5, 3, 17)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = triton_contract(*operands, geom)
        y2 = triton_contract(*operands, geom)
    ours = _ours(caught)
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "(import: ImportError" in str(ours[0].message) and "every configuration" in str(ours[0].message)
    want = _recipe(*operands, geom)
    torch.testing.assert_close(y1, want)
    torch.testing.assert_close(y2, want)
    assert [f["stage"] for f in fallback.failures()] == ["import"]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (injected)"), KeyboardInterrupt()])
def test_out_of_memory_and_interrupts_are_not_swallowed(error):
    def kernels():
        raise error

    with pytest.raises(type(error)):
        fallback.guarded("forward", ("k",), kernels, lambda: "pytorch")
    assert not fallback.failures()  # not remembered: the next chunk tries the kernels again


def test_a_failure_is_remembered_per_configuration():
    calls = []

    def kernels():
        calls.append(1)
        raise RuntimeError("Triton Error [CUDA]: invalid argument (injected)")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [fallback.guarded("forward", ("a",), kernels, lambda i=i: i) for i in range(3)] == [0, 1, 2]
        assert fallback.guarded("forward", ("b",), kernels, lambda: "b") == "b"  # another configuration tries
        assert fallback.guarded("forward", ("b",), lambda: "kernels", lambda: "pytorch") == "pytorch"
    assert len(calls) == 2
    assert len(_ours(caught)) == 1  # the same reason is warned once
    assert fallback.failures()[0]["reason"] == "RuntimeError: Triton Error [CUDA]: invalid argument (injected)"


# --- injected failures in the kernels, under the interpreter -------------------------------------


class _Fails:
    """Stands in for a kernel: every launch raises ``error`` (as a failed compile or launch does)."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls += 1
            raise self.error

        return launch


def _compile_error():
    import ast

    from triton.compiler.errors import CompilationError

    return CompilationError("x = tl.dot(a, b)", ast.parse("x = tl.dot(a, b)").body[0], "injected: dot shape mismatch")


def _conv(kind, groups=1):
    """A dynamic_conv2d on the fast path with the Triton backend, four chunks: output and gradients."""
    c = o = 2 * groups
    p, wsize = c * 9, o * (c // groups) * 9
    torch.manual_seed(0)
    gen = nn.Linear(p, wsize) if kind == "linear" else nn.Sequential(nn.Linear(p, 6), nn.Tanh(), nn.Linear(6, wsize))
    gen = gen.double()
    x = torch.randn(2, c, 5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(o, dtype=torch.float64, requires_grad=True)
    geom = conv_spec(2, in_channels=c, out_channels=o, kernel_size=3, groups=groups, padding=1).geometry(x.shape)
    assert choose_path(gen, geom, torch.float64).backend == "triton"
    y = chunkconv.dynamic_conv2d(x, gen, o, 3, bias=bias, padding=1, groups=groups, chunk_size=13)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, bias, *gen.parameters()], upstream)
    ref_gen = copy.deepcopy(gen)
    want = chunkconv.dynamic_conv_reference(
        x, ref_gen, out_channels=o, kernel_size=3, bias=bias, padding=1, groups=groups
    )
    want_grads = torch.autograd.grad(want, [x, bias, *ref_gen.parameters()], upstream)
    return (y.detach(), *grads), (want.detach(), *want_grads)


def _check_falls_back(monkeypatch, kind, groups, inject, stage, tries=1):
    """Without injection, then with it: the same results (and the reference's), one warning, ``tries`` launches."""
    clean, want = _conv(kind, groups)
    assert not fallback.failures()
    failing = inject(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _ = _conv(kind, groups)
    ours = _ours(caught)
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert f"({stage}: " in str(ours[0].message)
    assert [f["stage"] for f in fallback.failures()] == [stage]
    assert failing.calls == tries  # remembered: the other chunks did not try again
    for a, b, e in zip(got, clean, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    return str(ours[0].message)


def _replace(name, error):
    def inject(monkeypatch):
        from chunkconv.fast.kernels import contract

        failing = _Fails(error)
        monkeypatch.setattr(contract, name, failing)
        return failing

    return inject


@interp
@pytest.mark.parametrize("kind, groups", [("mlp", 1), ("linear", 1), ("mlp", 2)])
def test_interp_compile_failure(monkeypatch, kind, groups):
    message = _check_falls_back(monkeypatch, kind, groups, _replace("_fwd", _compile_error()), "forward")
    assert "CompilationError" in message and "injected: dot shape mismatch" in message


@interp
def test_interp_launch_failure(monkeypatch):
    error = RuntimeError("Triton Error [CUDA]: too many resources requested for launch (injected)")
    message = _check_falls_back(monkeypatch, "mlp", 1, _replace("_fwd", error), "forward")
    assert (
        "too many resources requested for launch" in message and "cpu, float64, 18 patch features, hidden 6" in message
    )


@interp
def test_interp_autotuning_failure(monkeypatch):
    # the real autotuner around the forward kernel, whose benchmark fails
    import triton

    def inject(monkeypatch):
        from chunkconv.fast.kernels import contract

        class Bench:
            calls = 0

            def __call__(self, kernel_call, quantiles=None):
                Bench.calls += 1
                raise RuntimeError("CUDA error: unspecified launch failure (injected in the benchmark)")

        bench = Bench()
        configs = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)]  # two: it must benchmark
        tuned = triton.autotune(configs=configs, key=["Pg", "H"], do_bench=bench)(contract._fwd_kernel)
        monkeypatch.setattr(contract, "_fwd", tuned)
        return bench

    message = _check_falls_back(monkeypatch, "mlp", 1, inject, "forward")
    assert "unspecified launch failure (injected in the benchmark)" in message


@interp
@pytest.mark.parametrize("kernel", ["_bwd_x", "_bwd_h", "_bwd_w"])
def test_interp_backward_kernel_failure(monkeypatch, kernel):
    error = RuntimeError(f"Triton Error [CUDA]: {kernel} failed (injected)")
    _check_falls_back(monkeypatch, "mlp", 1, _replace(kernel, error), "backward")


@interp
def test_interp_backward_failure_keeps_the_forward_kernels(monkeypatch):
    from chunkconv.fast.kernels import contract

    launches = []
    forward = contract._fwd

    class Counting:
        def __getitem__(self, grid):
            launches.append(1)
            return forward[grid]

    monkeypatch.setattr(contract, "_fwd", Counting())
    _check_falls_back(monkeypatch, "linear", 1, _replace("_bwd_x", RuntimeError("injected")), "backward")
    assert len(launches) == 2 * (4 + 4)  # both runs: forward and backward's recomputation, 4 chunks each


@interp
def test_interp_out_of_memory_in_a_kernel_is_retried_not_fallen_back(monkeypatch):
    # the executor halves the chunk and retries; the kernels run again on the smaller chunks
    from chunkconv.fast.kernels import contract

    forward = contract._fwd

    class OnceOutOfMemory:
        calls = 0

        def __getitem__(self, grid):
            OnceOutOfMemory.calls += 1
            if OnceOutOfMemory.calls == 1:
                raise torch.OutOfMemoryError("out of memory (injected)")
            return forward[grid]

    clean, want = _conv("mlp")
    monkeypatch.setattr(contract, "_fwd", OnceOutOfMemory())
    monkeypatch.setattr(chunkconv.execute, "_oom_warned", False)  # warned once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _ = _conv("mlp")
    assert not _ours(caught) and not fallback.failures()
    assert any("out of memory in the chunk" in str(w.message) for w in caught)
    for a, b in zip(got, clean):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
