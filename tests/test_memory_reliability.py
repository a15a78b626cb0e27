"""MemoryTracker under stress: several threads.

The planner measures every new shape with a tracker, so whatever goes wrong here goes wrong in
users' convolutions: a second planning thread must wait its turn.
"""

import threading

import pytest
import torch

import chunkconv
from chunkconv.memory import MemoryTracker


@pytest.fixture(autouse=True)
def _no_profiler_leaks_between_tests():
    yield
    if torch.autograd._profiler_enabled():  # a failed test left one on: stop it so later tests run clean
        torch.autograd._disable_profiler()


def _fresh_tracker_works():
    """A new tracker, in this thread and in another one, measures 40 bytes exactly."""
    with MemoryTracker("cpu") as t:
        x = torch.empty(10)
    assert (t.peak, t.current) == (40, 40)
    del x
    peaks = []

    def worker():
        with MemoryTracker("cpu") as t:
            y = torch.empty(20)
        peaks.append(t.peak)
        del y

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    thread.join(30)
    assert peaks == [80]


# --- threads ----------------------------------------------------------------------------------


def _conv(seed: int) -> chunkconv.DynamicConv2d:
    torch.manual_seed(seed)
    p = 2 * 3 * 3
    gen = torch.nn.Sequential(torch.nn.Linear(p, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3 * p), torch.nn.Tanh())
    return chunkconv.DynamicConv2d(gen, 2, 3, kernel_size=3, padding=1)


def test_two_threads_planning_at_once_give_the_serial_results():
    # Issue: two no-grad calls with new shapes in two threads raised "A MemoryTracker on cpu is
    # already active in another thread" (3 of 3 runs). Every call here plans (a new shape).
    for trial in range(3):
        inputs = [torch.randn(1, 2, 9 + 8 * trial + k, 11 + k) for k in range(6)]
        with torch.no_grad():
            serial_conv = _conv(trial)
            expected = [serial_conv(x) for x in inputs]
        conv = _conv(trial)  # same weights, empty plan cache
        results, errors = {}, []
        start = threading.Barrier(2)

        def worker(first, conv=conv, inputs=inputs, results=results, errors=errors, start=start):
            try:
                start.wait()
                with torch.no_grad():
                    for i in range(first, len(inputs), 2):
                        results[i] = conv(inputs[i])
            except BaseException as error:  # noqa: B036 - the test reports any failure
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(first,)) for first in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        assert sorted(results) == list(range(len(inputs)))
        for i, y in enumerate(expected):
            assert torch.equal(results[i], y), (trial, i)


def test_trackers_in_other_threads_wait_their_turn():
    entered, results = threading.Event(), []

    def worker():
        with MemoryTracker("cpu") as t:
            entered.set()
            x = torch.empty(1000, dtype=torch.uint8)
            del x
        results.append(t.peak)

    with MemoryTracker("cpu") as outer:
        a = torch.empty(300, dtype=torch.uint8)
        thread = threading.Thread(target=worker)
        thread.start()
        assert not entered.wait(0.2), "the second thread must wait while this thread measures"
        b = torch.empty(500, dtype=torch.uint8)
    thread.join(30)
    assert entered.is_set() and results == [1000]
    assert outer.peak == 800  # the worker's allocation, made after this block, is not counted
    del a, b


def test_nesting_in_the_owning_thread_does_not_wait():
    with MemoryTracker("cpu", timeout=0) as outer:
        with MemoryTracker("cpu", timeout=0) as inner:
            x = torch.empty(10)
    assert (outer.peak, inner.peak) == (40, 40)
    del x


def test_waiting_longer_than_the_timeout_raises():
    errors = []

    def worker():
        try:
            with MemoryTracker("cpu", timeout=0.05):
                pass
        except TimeoutError as error:
            errors.append(str(error))

    with MemoryTracker("cpu"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(30)
    assert len(errors) == 1
    assert errors[0].startswith("Timed out after 0.05 s waiting for the MemoryTracker on cpu of another thread")
    _fresh_tracker_works()


@pytest.mark.parametrize("timeout", [-1, float("nan"), "1"])
def test_invalid_timeouts(timeout):
    error = TypeError if isinstance(timeout, str) else ValueError
    with pytest.raises(error, match=r"^Invalid value for `timeout`; expected None or a number of seconds >= 0"):
        MemoryTracker("cpu", timeout=timeout)


def test_many_threads_each_measure_exactly_their_own_allocations():
    rounds, sizes = 10, [1000, 2000, 3000, 4000]
    peaks = {size: [] for size in sizes}
    errors = []
    start = threading.Barrier(len(sizes))

    def worker(size):
        try:
            start.wait()
            for _ in range(rounds):
                with MemoryTracker("cpu") as outer:
                    x = torch.empty(size, dtype=torch.uint8)
                    with MemoryTracker("cpu") as inner:
                        y = torch.empty(size, dtype=torch.uint8)
                    del x, y
                peaks[size].append((outer.peak, inner.peak))
        except BaseException as error:  # noqa: B036 - the test reports any failure
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(size,)) for size in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    for size in sizes:
        assert peaks[size] == [(2 * size, size)] * rounds
