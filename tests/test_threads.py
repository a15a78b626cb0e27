"""One layer used from several threads at once gives exactly what it gives serially."""

import threading

import torch
from torch import nn

import chunkconv
from chunkconv.binding import bind_parameters

F64 = torch.float64


def _layer():
    torch.manual_seed(0)
    p = 4 * 9
    gen = nn.Sequential(nn.Linear(p, 8), nn.Tanh(), nn.Linear(8, 4 * p)).to(F64)
    return chunkconv.DynamicConv2d(gen, 4, 4, 3, padding=1, chunk_size=7, dtype=F64)


def _run_threads(*targets):
    errors = []

    def guarded(fn):
        try:
            fn()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_training_from_two_threads_matches_serial():
    conv = _layer()
    params = list(conv.parameters())
    xs = [torch.randn(2, 4, 8, 8, dtype=F64) for _ in range(2)]

    def grads(x):
        return torch.autograd.grad(conv(x).square().sum(), params)

    serial = [grads(x) for x in xs]
    results: dict[int, list] = {0: [], 1: []}

    def train(i):
        for _ in range(15):
            results[i].append(grads(xs[i]))

    _run_threads(lambda: train(0), lambda: train(1))
    for i in (0, 1):
        for got in results[i]:
            for g, want in zip(got, serial[i]):
                torch.testing.assert_close(g, want, rtol=0, atol=1e-12)
    # the layer is intact: every parameter is still a Parameter of the generator
    assert all(isinstance(p, nn.Parameter) for p in conv.parameters())
    assert [id(p) for p in conv.parameters()] == [id(p) for p in params]


def test_backward_from_two_threads_accumulates_every_gradient():
    # the defect: functional_call's swap-and-restore left stand-ins in the shared module, whose
    # gradients were then lost without an error
    conv = _layer()
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    conv(x).square().sum().backward()
    one = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()

    def train():
        for _ in range(10):
            conv(x).square().sum().backward()

    _run_threads(train, train)
    for p, g in zip(conv.parameters(), one):
        assert isinstance(p, nn.Parameter)
        torch.testing.assert_close(p.grad, 20 * g)


def test_inference_during_training_in_another_thread_reads_the_real_parameters():
    conv = _layer()
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    with torch.no_grad():
        want = conv(x)
    seen = []

    def infer():
        for _ in range(30):
            with torch.no_grad():
                seen.append(conv(x))

    def train():
        for _ in range(15):
            torch.autograd.grad(conv(x).sum(), list(conv.parameters()))

    _run_threads(infer, train)
    for y in seen:
        assert torch.equal(y, want)


def test_binding_never_modifies_the_module():
    gen = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(F64)
    before = {n: t for n, t in [*gen.named_parameters(), *gen.named_buffers()]}
    stand_ins = {n: t.detach().clone() + 1 for n, t in before.items()}
    bound = bind_parameters(gen, stand_ins)
    out = bound(torch.randn(5, 3, dtype=F64))
    assert out.shape == (5, 4)
    after = {n: t for n, t in [*gen.named_parameters(), *gen.named_buffers()]}
    assert all(after[n] is before[n] for n in before)
    # the running statistics were updated on the stand-ins, not on the module's buffers
    assert torch.equal(gen[1].running_mean, torch.zeros(4, dtype=F64))
    assert not torch.equal(stand_ins["1.running_mean"], before["1.running_mean"] + 1)


def test_planning_in_a_worker_while_the_caller_holds_a_tracker_does_not_hang(monkeypatch):
    # trackers take turns between threads; a probe waiting on a thread that waits on it would
    # deadlock, so it gives up after a while and bounds the bytes instead (not cached)
    monkeypatch.setattr(chunkconv.measure, "_TRACKER_TIMEOUT", 0.2)
    conv = _layer()
    conv.chunk_size = None
    out = []
    with chunkconv.MemoryTracker():
        worker = threading.Thread(target=lambda: out.append(conv.plan((1, 4, 9, 9))))
        worker.start()
        worker.join(timeout=60)
    assert not worker.is_alive() and out
    assert "bounded by summing op outputs" in str(out[0])
    assert "measured by the allocator" in str(conv.plan((1, 4, 9, 9)))  # the bound was not cached
