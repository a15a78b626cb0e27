"""DDP and FSDP on CPU/gloo: 2 processes give the gradients of one process on the whole batch.

One module-scoped fixture spawns the two workers once; they run every scenario
in the same process group and rank 0 reports, per scenario, the largest
difference from the unchunked oracle (or the error raised). Each test then
checks one scenario, so a failure names what broke.
"""

import copy
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import chunkconv
from chunkconv.geometry import conv_spec
from chunkconv.testing import mlp_generator

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
TIMEOUT_S = 90  # the whole spawn: imports, process group, every scenario (about 15 s on 2 busy cores)
SPEC = conv_spec(2, in_channels=3, out_channels=4, kernel_size=3, padding=1)
KW = dict(out_channels=4, kernel_size=3, padding=1)


class Net(nn.Module):
    def __init__(self, chunk_size, path):
        super().__init__()
        self.pre = nn.Conv2d(3, 3, 1)
        gen = mlp_generator(SPEC, hidden=8)
        self.dyn = chunkconv.DynamicConv(gen, 3, 4, 3, padding=1, chunk_size=chunk_size, path=path)
        self.head = nn.Conv2d(4, 2, 1)
        self.reference = False

    def forward(self, x):
        h = self.pre(x).tanh()
        if self.reference:
            h = chunkconv.dynamic_conv_reference(h, self.dyn.generator, bias=self.dyn.bias, **KW)
        else:
            h = self.dyn(h)
        return self.head(h)


class FormsNet(nn.Module):
    """Side inputs and structured kernels: a feature branch drives a shared (KPN-like) layer, the
    input guides a modulated (PAC-like) one; both branches and the guide train."""

    def __init__(self, chunk_size):
        super().__init__()
        self.pre = nn.Conv2d(3, 3, 1)
        self.branch = nn.Conv2d(3, 4, 3, padding=1)
        self.kpn = chunkconv.DynamicConv(
            nn.Sequential(nn.Linear(4, 27), nn.Softmax(dim=1)), 3, 3, 3, padding=1, chunk_size=chunk_size,
            kernel="shared", kernel_groups=3, inputs=("features",),
        )  # fmt: skip
        self.pac = chunkconv.DynamicConv(
            nn.Sequential(nn.Linear(27, 9), nn.Sigmoid()), 3, 4, 3, padding=1, chunk_size=chunk_size,
            kernel="modulated", inputs=("guide",),
        )  # fmt: skip
        self.head = nn.Conv2d(4, 2, 1)
        self.reference = False

    def forward(self, x):
        h = self.pre(x).tanh()
        f = self.branch(x)
        if self.reference:
            k = self.kpn
            h = chunkconv.dynamic_conv_reference(
                h, k.generator, out_channels=3, kernel_size=3, padding=1, bias=k.bias, kernel="shared",
                kernel_groups=3, inputs=("features",), features=f,
            )  # fmt: skip
            p = self.pac
            h = chunkconv.dynamic_conv_reference(
                h, p.generator, out_channels=4, kernel_size=3, padding=1, bias=p.bias, kernel="modulated",
                weight=p.weight, inputs=("guide",), guide=x,
            )  # fmt: skip
        else:
            h = self.pac(self.kpn(h, features=f), guide=x)
        return self.head(h)


def _ddp_forms(x, shard):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = FormsNet(chunk_size=7).double()
    want = _reference_grads(model, x)
    ddp = DDP(model)
    errors = []
    for _ in range(2):
        ddp.zero_grad()
        ddp(shard).square().mean().backward()
        errors.append(_max_error({n.removeprefix("module."): p.grad for n, p in ddp.named_parameters()}, want))
    return max(errors)


def _make(chunk_size, path="auto"):
    torch.manual_seed(0)
    return Net(chunk_size, path).double()


def _reference_grads(model, x):
    """Gradients of the loss on the whole batch, one process, unchunked oracle."""
    ref = copy.deepcopy(model)
    ref.reference = True
    ref.zero_grad()
    ref(x).square().mean().backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def _max_error(got, want):
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    return max((got[n] - want[n]).abs().max().item() for n in want)


def _ddp(x, shard, chunk_size, path="auto"):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _make(chunk_size, path)
    want = _reference_grads(model, x)
    ddp = DDP(model)  # find_unused_parameters left at its default (False)
    errors = []
    for _ in range(3):  # repeated iterations: a parameter marked ready twice would raise here
        ddp.zero_grad()
        ddp(shard).square().mean().backward()
        errors.append(_max_error({n.removeprefix("module."): p.grad for n, p in ddp.named_parameters()}, want))
    return max(errors)


def _ddp_budget(x, shard):
    """DDP with a budget so small that the plan splits each rank's 50 patches into many chunks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _make(None)
    want = _reference_grads(model, x)
    plan = model.dyn.plan(shard.shape)
    budget = plan.minimum_budget
    while True:  # the smallest budget (in 0.5% steps) that allows about 6 patches per chunk
        model.dyn.budget = int(budget)
        if model.dyn.plan(shard.shape).chunk_size >= 6:
            break
        budget *= 1.005
    chunks = model.dyn.plan(shard.shape).num_chunks
    if chunks < 5:
        return f"the budget gave only {chunks} chunks"
    ddp = DDP(model)
    errors = []
    for _ in range(2):
        ddp.zero_grad()
        ddp(shard).square().mean().backward()
        errors.append(_max_error({n.removeprefix("module."): p.grad for n, p in ddp.named_parameters()}, want))
    return max(errors)


def _fsdp(x, shard, chunk_size, shard_layer, path="auto"):
    from torch.distributed.fsdp import fully_shard

    model = _make(chunk_size, path)
    want = _reference_grads(model, x)
    if shard_layer:
        fully_shard(model.dyn)  # the DynamicConv as its own unit: gathered, freed after forward, re-gathered
    fully_shard(model)
    errors = []
    for _ in range(2):
        model.zero_grad()
        model(shard).square().mean().backward()
        errors.append(_max_error({n: p.grad.full_tensor() for n, p in model.named_parameters()}, want))
    return max(errors)


def _fsdp_generator_refused(x, shard):
    from torch.distributed.fsdp import fully_shard

    model = _make(4)
    fully_shard(model.dyn.generator)
    try:
        model(shard)
    except ValueError as e:
        return str(e)
    return "no error"


SCENARIOS = {
    "ddp_default_chunking": lambda x, s: _ddp(x, s, None),
    "ddp_many_chunks": lambda x, s: _ddp(x, s, 3),  # 50 patches per rank -> 17 chunks
    "ddp_many_chunks_generic": lambda x, s: _ddp(x, s, 3, "generic"),
    "ddp_small_budget": _ddp_budget,
    "fsdp_root": lambda x, s: _fsdp(x, s, 3, shard_layer=False),
    "fsdp_layer": lambda x, s: _fsdp(x, s, 3, shard_layer=True),
    "fsdp_layer_generic": lambda x, s: _fsdp(x, s, 3, shard_layer=True, path="generic"),
    "fsdp_generator_refused": _fsdp_generator_refused,
    "ddp_forms_and_side_inputs": _ddp_forms,
}


def _worker(rank, port, out_path):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        torch.manual_seed(1)
        x = torch.randn(2 * WORLD, 3, 5, 5, dtype=torch.float64)
        shard = x.chunk(WORLD)[rank]
        results = {}
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(x, shard)
            except Exception:
                results[name] = "raised:\n" + traceback.format_exc()
            dist.barrier()
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return torch.load(out, weights_only=False)


def _error(results, name):
    value = results[name]
    assert not isinstance(value, str), value
    return value


@pytest.mark.parametrize(
    "name",
    [
        "ddp_default_chunking",
        "ddp_many_chunks",
        "ddp_many_chunks_generic",
        "ddp_small_budget",
        "ddp_forms_and_side_inputs",
    ],
)
def test_ddp_gradients_equal_one_process_on_the_whole_batch(results, name):
    assert _error(results, name) < 1e-12


@pytest.mark.parametrize("name", ["fsdp_root", "fsdp_layer", "fsdp_layer_generic"])
def test_fully_shard_gradients_equal_one_process_on_the_whole_batch(results, name):
    assert _error(results, name) < 1e-12


def test_sharding_the_generator_itself_is_refused_with_a_fix(results):
    message = results["fsdp_generator_refused"]
    assert message.startswith("Invalid `generator`: the generator is sharded by FSDP"), message
    assert "fully_shard(conv), not fully_shard(conv.generator)" in message
