"""torch.compile: a model containing DynamicConv compiles, with one graph break, and matches eager."""

import copy

import pytest
import torch
from torch import nn

import chunkconv
from chunkconv.geometry import conv_spec
from chunkconv.testing import mlp_generator

SPEC = conv_spec(2, in_channels=3, out_channels=4, kernel_size=3, padding=1)


class Net(nn.Module):
    """Static layers around a DynamicConv, as in a real model; ``reference=True`` uses the oracle."""

    def __init__(self, generator: nn.Module, reference: bool = False, path: str = "auto"):
        super().__init__()
        self.pre = nn.Conv2d(3, 3, 1)
        self.dyn = chunkconv.DynamicConv(generator, 3, 4, 3, padding=1, chunk_size=7, path=path)
        self.post = nn.Conv2d(4, 2, 1)
        self.reference = reference

    def forward(self, x):
        h = self.pre(x).relu()
        if self.reference:
            h = chunkconv.dynamic_conv_reference(h, self.dyn.generator, bias=self.dyn.bias, **_KW)
        else:
            h = self.dyn(h)
        return self.post(torch.tanh(h)).sum(dim=(2, 3))


_KW = dict(out_channels=4, kernel_size=3, padding=1)


def _outputs_and_grads(model, x, seed=0):
    torch.manual_seed(seed)
    x = x.detach().requires_grad_()
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    return y.detach(), grads


class CountingBackend:
    """A dynamo backend that records each graph and runs it as is (the "eager" backend)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _called(gm):
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    return [str(getattr(n.target, "__name__", n.target)) for n in calls]


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_compiled_model_is_one_graph_break_and_matches_eager_and_reference(path):
    torch._dynamo.reset()
    eager = Net(mlp_generator(SPEC, hidden=8), path=path).double()
    reference = copy.deepcopy(eager)
    reference.reference = True
    backend = CountingBackend()
    compiled = torch.compile(copy.deepcopy(eager), backend=backend)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)

    got_y, got_grads = _outputs_and_grads(compiled, x)
    # the static layers before and after are two graphs; the dynamic conv ran eagerly between them
    assert len(backend.graphs) == 2
    assert _called(backend.graphs[0]) == ["conv2d", "relu"]
    assert _called(backend.graphs[1]) == ["tanh", "conv2d", "sum"]

    want_y, want_grads = _outputs_and_grads(eager, x)
    assert torch.equal(got_y, want_y)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
    ref_y, ref_grads = _outputs_and_grads(reference, x)
    torch.testing.assert_close(got_y, ref_y)
    for g, w in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, w)

    # a second call with the same shapes reuses both graphs
    _outputs_and_grads(compiled, x)
    assert len(backend.graphs) == 2


def test_aot_eager_with_dropout_in_the_generator_replays_eager_masks():
    # the generator runs eagerly even inside a compiled model, so backward's recomputation
    # draws the same dropout masks as forward did, and a seeded run equals the eager one
    torch._dynamo.reset()
    gen = nn.Sequential(nn.Linear(27, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 4 * 27))
    eager = Net(gen).double()
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    got_y, got_grads = _outputs_and_grads(compiled, x, seed=3)
    want_y, want_grads = _outputs_and_grads(eager, x, seed=3)
    torch.testing.assert_close(got_y, want_y, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_functional_form_inside_a_compiled_function():
    torch._dynamo.reset()
    gen = mlp_generator(SPEC, hidden=4)

    def f(x):
        return chunkconv.dynamic_conv2d(x * 2, gen, 4, 3, padding=1, chunk_size=5).sin()

    x = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = torch.compile(f, backend="eager")(x)
    want = chunkconv.dynamic_conv_reference(x * 2, gen, **_KW).sin()
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


def test_fullgraph_is_refused_at_the_dynamic_conv():
    # documented limitation: the layer is a graph break, so fullgraph=True cannot hold
    torch._dynamo.reset()
    model = Net(mlp_generator(SPEC, hidden=4)).double()
    with pytest.raises(Exception, match="apply_spec"):
        torch.compile(model, backend="eager", fullgraph=True)(torch.randn(1, 3, 5, 5, dtype=torch.float64))


@pytest.mark.slow
def test_inductor_matches_eager():
    # about a minute on a loaded 2-core CPU runner, mostly the C++ compile of the two graphs
    torch._dynamo.reset()
    eager = Net(mlp_generator(SPEC, hidden=8)).double()
    compiled = torch.compile(copy.deepcopy(eager))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    got_y, got_grads = _outputs_and_grads(compiled, x)
    want_y, want_grads = _outputs_and_grads(eager, x)
    torch.testing.assert_close(got_y, want_y)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
