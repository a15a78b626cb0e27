"""MemoryTracker: its numbers are what budget tests trust, so pin them against known allocations."""

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chunkconv.memory import MemoryTracker

MB4 = 4_000_000  # bytes of torch.empty(1_000_000) in float32


def _in_4mb(n):
    return MB4 <= n < 4_200_000


# --- CPU: single allocations ------------------------------------------------------------------


def test_allocation_is_measured():
    with MemoryTracker("cpu") as t:
        x = torch.empty(1_000_000)
    assert _in_4mb(t.peak)
    assert _in_4mb(t.current)
    del x


def test_freed_allocation_keeps_peak_but_not_current():
    with MemoryTracker("cpu") as t:
        x = torch.empty(1_000_000)
        del x
    assert _in_4mb(t.peak)
    assert t.current == 0


def test_sequential_allocations_do_not_add_up():
    with MemoryTracker("cpu") as t:
        x = torch.empty(1_000_000)
        del x
        y = torch.empty(1_000_000)
        del y
    assert _in_4mb(t.peak)
    assert t.current == 0


def test_overlapping_allocations_add_up():
    with MemoryTracker("cpu") as t:
        x = torch.empty(1_000_000)
        y = torch.empty(1_000_000)
        del x, y
    assert 2 * MB4 <= t.peak < 2 * MB4 + 200_000


def test_views_do_not_double_count():
    with MemoryTracker("cpu") as t:
        x = torch.empty(1_000_000)
        views = [x.view(1000, 1000), x[::2], x.view(1000, 1000).t(), x.reshape(10, -1), x.unsqueeze(0), x.detach()]
        del x, views
    assert _in_4mb(t.peak)
    assert t.current == 0


def test_allocations_before_the_block_do_not_count():
    before = torch.empty(1_000_000)
    kept = torch.empty(1_000_000)
    with MemoryTracker("cpu") as t:
        del before  # frees memory allocated earlier: ignored on the CPU
        kept.add_(1)  # in place: only the scalar 1 becomes a (tiny) tensor
    assert t.peak < 64
    assert t.current == 0
    del kept


def test_dtype_sizes():
    with MemoryTracker("cpu") as t:
        x = torch.empty(1000, dtype=torch.float64)
        y = torch.empty(1000, dtype=torch.uint8)
        z = torch.empty(1000, dtype=torch.complex64)
    assert t.peak == 8000 + 1000 + 8000
    del x, y, z


@st.composite
def alloc_free_programs(draw):
    """A random sequence of allocations (bytes) and frees (index into the live list, mod len)."""
    steps = draw(st.lists(st.one_of(st.integers(1, 2**20), st.integers(-1000, -1)), max_size=12), label="steps")
    return steps


@given(alloc_free_programs())
def test_peak_is_exact_for_random_alloc_free_programs(steps):
    live, total, expected_peak = [], 0, 0
    with MemoryTracker("cpu") as t:
        for step in steps:
            if step > 0:
                live.append(torch.empty(step, dtype=torch.uint8))
                total += step
                expected_peak = max(expected_peak, total)
            elif live:
                freed = live.pop(-step % len(live))
                total -= freed.nbytes
                del freed
    assert t.peak == expected_peak
    assert t.current == total


# --- CPU: autograd ----------------------------------------------------------------------------


def test_matmul_forward_and_backward_are_measured():
    x = torch.randn(1000, 500)
    w = torch.randn(500, 500, requires_grad=True)
    with MemoryTracker("cpu") as t:
        y = x @ w  # 2 MB output, saved tensors are x and w (already allocated)
        y.sum().backward()  # 1 MB grad for w, plus temporaries
        del y
    assert t.peak >= 2_000_000 + 1_000_000  # y and w.grad were alive together
    assert t.peak < 6_000_000  # plus at most one y-sized temporary and scalars
    assert t.current == w.grad.nbytes  # only the gradient survives the block


def test_backward_alone_is_measured():
    x = torch.randn(1000, 500)
    w = torch.randn(500, 500, requires_grad=True)
    loss = (x @ w).relu().sum()  # forward outside the block: the graph and saved tensors exist
    with MemoryTracker("cpu") as t:
        loss.backward()
    assert t.peak >= w.grad.nbytes + 2_000_000  # grad of w plus a y-sized grad buffer
    assert t.current == w.grad.nbytes


def test_saved_tensors_are_counted():
    x = torch.randn(1_000_000, requires_grad=True)
    with MemoryTracker("cpu") as t_grad:
        y = x.exp().exp().sum()  # two 4 MB intermediates, both saved for backward
    with torch.no_grad(), MemoryTracker("cpu") as t_no_grad:
        z = x.exp().exp().sum()  # the first one is freed before the second is made
    assert 2 * MB4 <= t_grad.current < 2 * MB4 + 1000
    assert t_no_grad.current < 1000
    assert 2 * MB4 <= t_grad.peak
    assert t_no_grad.peak < 2 * MB4 + 1000
    del y, z


def test_kernel_internal_temporaries_are_seen():
    # float64 conv2d on the CPU runs slow_conv2d, which unfolds the input into a buffer
    # (N * C*kh*kw * H*W * 8 bytes = 9.4 MB) that never becomes a Python tensor; a tracker that
    # only counted op outputs would report ~1 MB here.
    x = torch.randn(2, 16, 64, 64, dtype=torch.float64)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    with MemoryTracker("cpu") as t:
        y = torch.nn.functional.conv2d(x, w, padding=1)
    assert t.current == y.nbytes
    assert t.peak >= y.nbytes + 2 * 16 * 9 * 64 * 64 * 8


# --- CPU: nesting, errors, limits -------------------------------------------------------------


def test_nested_trackers_each_see_their_own_block():
    with MemoryTracker("cpu") as outer:
        a = torch.empty(1_000_000)  # 4 MB
        with MemoryTracker("cpu") as inner:
            del a  # allocated by the outer block: frees count for the outer tracker only
            b = torch.empty(500_000)  # 2 MB
            c = torch.empty(2_000_000)  # 8 MB
            del c
        d = torch.empty(250_000)  # 1 MB
    assert (inner.peak, inner.current) == (10_000_000, 2_000_000)
    assert (outer.peak, outer.current) == (10_000_000, 3_000_000)
    del b, d


def test_three_levels_of_nesting():
    with MemoryTracker() as t1:
        x1 = torch.empty(1000, dtype=torch.uint8)
        with MemoryTracker() as t2:
            x2 = torch.empty(2000, dtype=torch.uint8)
            with MemoryTracker() as t3:
                x3 = torch.empty(4000, dtype=torch.uint8)
                del x3
            del x2
    assert (t1.peak, t2.peak, t3.peak) == (7000, 6000, 4000)
    assert (t1.current, t2.current, t3.current) == (1000, 0, 0)
    del x1


def test_tracker_can_be_reused_sequentially():
    t = MemoryTracker()
    with t:
        x = torch.empty(1_000_000)
    assert _in_4mb(t.peak)
    with t:
        del x
    assert (t.peak, t.current) == (0, 0)


def test_reentering_an_active_tracker_raises():
    with MemoryTracker() as t:
        with pytest.raises(RuntimeError, match=r"^This MemoryTracker is already active; nest a new MemoryTracker"):
            t.__enter__()


def test_results_before_exit_raise():
    t = MemoryTracker()
    expected = r"^MemoryTracker\.peak is known once its `with` block has exited; the block has not run yet\.$"
    with pytest.raises(RuntimeError, match=expected):
        _ = t.peak
    with t:
        with pytest.raises(RuntimeError, match=r"^MemoryTracker\.current is known .*; the block is still running\.$"):
            _ = t.current


def test_exiting_out_of_order_raises():
    outer, inner = MemoryTracker(), MemoryTracker()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError, match=r"^MemoryTrackers must exit in the reverse order of entering"):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    assert not torch.autograd._profiler_enabled()


def test_exception_in_block_still_stops_measuring():
    with pytest.raises(ZeroDivisionError), MemoryTracker() as t:
        x = torch.empty(1_000_000)
        raise ZeroDivisionError
    assert _in_4mb(t.peak)
    assert not torch.autograd._profiler_enabled()
    del x
    with MemoryTracker() as t:
        torch.empty(10)
    assert t.peak == 40


def test_refuses_to_run_under_a_profiler():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        with pytest.raises(RuntimeError, match=r"^Cannot start a CPU MemoryTracker while a torch profiler is running"):
            MemoryTracker("cpu").__enter__()


def test_allocations_on_other_threads_are_not_seen():
    # A documented limit: the profiler reports allocations of the thread that entered the tracker.
    with MemoryTracker("cpu") as t:
        thread = threading.Thread(target=lambda: torch.empty(1_000_000))
        thread.start()
        thread.join()
    assert t.peak == 0


def test_repr():
    t = MemoryTracker("cpu")
    assert repr(t) == "MemoryTracker(device='cpu')"
    with t:
        x = torch.empty(7 * 2**18)  # 7 MiB of float32
    assert repr(t) == "MemoryTracker(device='cpu', peak=7.00 MiB, current=7.00 MiB)"
    del x


def test_invalid_devices():
    with pytest.raises(ValueError, match=r"^Invalid value for `device`; MemoryTracker watches 'cpu' and 'cuda'"):
        MemoryTracker("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^Invalid value for `device`; CUDA is not available here"):
            MemoryTracker("cuda")


def test_a_profiler_run_inside_the_block_is_an_error_not_a_wrong_number():
    t = MemoryTracker("cpu")
    with pytest.raises(RuntimeError, match=r"^The profiler session of a CPU MemoryTracker was stopped inside"):
        with t:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
                pass
    assert not torch.autograd._profiler_enabled()
    with t:  # and the tracker works again
        x = torch.empty(10)
    assert t.peak == 40
    del x


# --- CUDA -------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_allocation_free_and_views():
    with MemoryTracker("cuda") as t:
        x = torch.empty(1_000_000, device="cuda")
        v = x.view(1000, 1000)[::2]
        del x, v
        y = torch.empty(1_000_000, device="cuda")
        del y
    assert _in_4mb(t.peak)  # the caching allocator rounds to 512-byte blocks
    assert t.current == 0


@pytest.mark.cuda
def test_cuda_nested_and_backward():
    x = torch.randn(1000, 500, device="cuda")
    w = torch.randn(500, 500, device="cuda", requires_grad=True)
    with MemoryTracker("cuda") as outer:
        y = x @ w
        with MemoryTracker("cuda") as inner:
            y.sum().backward()
        del y
    assert inner.peak >= w.grad.nbytes
    assert outer.peak >= 2_000_000 + w.grad.nbytes
    assert outer.current == w.grad.nbytes


@pytest.mark.cuda
def test_cuda_and_cpu_trackers_are_independent():
    with MemoryTracker("cpu") as cpu, MemoryTracker("cuda") as cuda:
        a = torch.empty(1_000_000)
        b = torch.empty(1_000_000, device="cuda")
    assert _in_4mb(cpu.peak) and _in_4mb(cuda.peak)
    del a, b
