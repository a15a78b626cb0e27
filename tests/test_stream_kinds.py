"""A new kind of stream is one class and one entry: registered in ``streams.KINDS``, it runs end to end.

The kind here (positions scaled by two, standing in for positions in the frame of a larger
image) is defined in the test alone; the call, its checks, the planner's probes and fixed costs,
the executor and the autograd Function take it from its class.
"""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import chunkconv
from chunkconv import streams
from chunkconv.gather import ChunkIndex, PositionStream

F64 = torch.float64


class _Doubled:
    requires_grad = False

    def __init__(self, inner: PositionStream) -> None:
        self.inner = inner

    def gather(self, chunk: ChunkIndex) -> torch.Tensor:
        return 2 * self.inner.gather(chunk)

    def add_grad(self, chunk: ChunkIndex, grad: torch.Tensor) -> None:
        raise AssertionError("no gradient")

    def grad(self) -> None:
        return None


@dataclass(frozen=True)
class DoubledPositions(streams.Positions):
    name: ClassVar[str] = "doubled_positions"

    def open(self, spec, sources, geom, grads, like, layout="rows"):
        return _Doubled(PositionStream(geom, like.dtype, like.device))


class Concat(nn.Module):
    def __init__(self, width: int, out: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.net = nn.Sequential(nn.Linear(width, 6), nn.Tanh(), nn.Linear(6, out))

    def forward(self, patches, positions):
        return self.net(torch.cat([patches, self.scale * positions], dim=1))


@pytest.mark.parametrize("training", [False, True])
def test_a_kind_registered_in_KINDS_runs_end_to_end(monkeypatch, training):
    monkeypatch.setitem(streams.KINDS, DoubledPositions.name, DoubledPositions())
    torch.manual_seed(0)
    gen = Concat(2 * 9 + 2, 3 * 2 * 9).double()
    x = torch.randn(2, 2, 7, 6, dtype=F64, requires_grad=training)
    kwargs = dict(out_channels=3, kernel_size=3, padding=1, budget="64MB")
    y = chunkconv.dynamic_conv2d(x, gen, inputs=("patches", "doubled_positions"), **kwargs)
    doubling = Concat(2 * 9 + 2, 3 * 2 * 9, scale=2.0).double()
    doubling.load_state_dict(gen.state_dict())
    want = chunkconv.dynamic_conv_reference(
        x, doubling, out_channels=3, kernel_size=3, padding=1, inputs=("patches", "positions")
    )
    torch.testing.assert_close(y, want)
    plan = chunkconv.plan(x.shape, gen, inputs=("patches", "doubled_positions"), training=training, **kwargs)
    assert "doubled_positions" in str(plan)
    if training:
        upstream = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *gen.parameters()], upstream)
        ref = torch.autograd.grad(want, [x, *doubling.parameters()], upstream)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r)
