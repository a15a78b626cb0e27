"""DynamicConv follows nn.Module conventions: devices/dtypes, state dicts, copies, pickling, repr, layouts."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import chunkconv
import chunkconv.execute
from chunkconv.geometry import conv_spec
from chunkconv.testing import mlp_generator

SPEC = conv_spec(2, in_channels=3, out_channels=4, kernel_size=3, padding=1)
KW = dict(out_channels=4, kernel_size=3, padding=1)


def _conv(chunk_size=7, dtype=torch.float64, **kwargs):
    return chunkconv.DynamicConv(
        mlp_generator(SPEC, hidden=6, dtype=dtype), 3, 4, 3, padding=1, chunk_size=chunk_size, dtype=dtype, **kwargs
    )


def _reference(conv, x):
    return chunkconv.dynamic_conv_reference(x, conv.generator, bias=conv.bias, **KW)


def _x(dtype=torch.float64, requires_grad=False, shape=(2, 3, 5, 6)):
    return torch.randn(shape, dtype=dtype, requires_grad=requires_grad)


def _grads(y, leaves, upstream):
    return torch.autograd.grad(y, leaves, upstream, allow_unused=True)


def test_to_dtype_converts_generator_and_bias():
    conv = _conv(dtype=torch.float32).to(torch.float64)
    assert {p.dtype for p in conv.parameters()} == {torch.float64}
    x = _x()
    torch.testing.assert_close(conv(x), _reference(conv, x))
    assert conv.to("cpu") is conv and conv.bias.device.type == "cpu"


@pytest.mark.cuda
def test_to_cuda_moves_everything_and_matches_the_reference():
    conv = _conv().to("cuda")
    assert {p.device.type for p in conv.parameters()} == {"cuda"}
    x = _x(requires_grad=True).cuda()
    y, want = conv(x), _reference(conv, x)
    torch.testing.assert_close(y, want)
    up = torch.randn_like(y)
    for g, w in zip(_grads(y, [x, *conv.parameters()], up), _grads(want, [x, *conv.parameters()], up)):
        torch.testing.assert_close(g, w)


def test_factory_kwargs_apply_to_the_parameters_the_layer_creates():
    gen = mlp_generator(SPEC, hidden=6, dtype=torch.float32)
    conv = chunkconv.DynamicConv(gen, 3, 4, 3, padding=1, device="cpu", dtype=torch.float64)
    assert conv.bias.dtype == torch.float64 and conv.bias.device.type == "cpu"
    assert conv.generator is gen and gen[0].weight.dtype == torch.float32  # the user's generator is left as given


def test_meta_construction_then_materialise():
    # the FSDP-style deferred init: build on meta, then to_empty + reset_parameters
    conv = chunkconv.DynamicConv(
        mlp_generator(SPEC, hidden=6, device="meta"), 3, 4, 3, padding=1, device="meta", dtype=torch.float64
    )
    assert all(p.is_meta for p in conv.parameters())
    conv.to_empty(device="cpu")
    conv.reset_parameters()
    for m in conv.generator.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    x = _x()
    torch.testing.assert_close(conv(x), _reference(conv, x))


def test_state_dict_round_trip():
    conv = _conv(bias=True)
    assert set(conv.state_dict()) == {
        "bias",
        "generator.0.weight",
        "generator.0.bias",
        "generator.2.weight",
        "generator.2.bias",
    }
    other = _conv(bias=True)
    x = _x()
    assert not torch.equal(conv(x), other(x))
    other.load_state_dict(conv.state_dict())
    assert torch.equal(conv(x), other(x))


def test_deepcopy_is_independent():
    conv = _conv()
    twin = copy.deepcopy(conv)
    x = _x()
    assert torch.equal(conv(x), twin(x))
    with torch.no_grad():
        twin.generator[0].weight.add_(1.0)
    assert not torch.equal(conv(x), twin(x))
    assert twin.spec == conv.spec and twin.chunk_size == conv.chunk_size


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_whole_module_serialises(how):
    conv = _conv(stride=2, padding_mode="reflect", allow_batch_coupled=True)
    if how == "pickle":
        back = pickle.loads(pickle.dumps(conv))
    else:
        buf = io.BytesIO()
        torch.save(conv, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
    x = _x()
    assert torch.equal(conv(x), back(x))
    assert repr(back) == repr(conv)


def module_level_generator(patches):
    """A plain-function generator: picklable by reference."""
    return torch.tanh(patches).repeat(1, 4)


def test_plain_function_generator_serialises_but_a_lambda_does_not():
    conv = chunkconv.DynamicConv(module_level_generator, 3, 4, 3, padding=1, chunk_size=5, dtype=torch.float64)
    back = pickle.loads(pickle.dumps(conv))
    x = _x()
    assert torch.equal(conv(x), back(x))
    # documented limitation: pickle stores functions by name, and a lambda has none
    conv.generator = lambda patches: module_level_generator(patches)
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        pickle.dumps(conv)
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        torch.save(conv, io.BytesIO())


def test_repr_shows_only_non_default_arguments():
    gen = mlp_generator(SPEC, hidden=6)
    plain = chunkconv.DynamicConv(gen, 3, 4, 3)
    assert plain.extra_repr() == "3, 4, kernel_size=(3, 3)"
    full = chunkconv.DynamicConv(
        gen,
        3,
        4,
        (3, 1),
        stride=2,
        padding=1,
        dilation=(1, 2),
        groups=1,
        bias=False,
        padding_mode="circular",
        chunk_size=9,
        allow_batch_coupled=True,
    )
    assert full.extra_repr() == (
        "3, 4, kernel_size=(3, 1), stride=(2, 2), padding=(1, 1), dilation=(1, 2), bias=False, "
        "padding_mode='circular', chunk_size=9, allow_batch_coupled=True"
    )
    assert "(generator): Sequential(" in repr(full)
    assert chunkconv.DynamicConv(module_level_generator, 3, 4, 3).extra_repr() == (
        "3, 4, kernel_size=(3, 3), generator=module_level_generator"
    )


@pytest.mark.parametrize("padding", [0, 1])
def test_channels_last_input_equals_contiguous_and_is_gathered_in_place(monkeypatch, padding):
    conv = chunkconv.DynamicConv(
        mlp_generator(SPEC, hidden=6), 3, 4, 3, padding=padding, chunk_size=7, dtype=torch.float64
    )
    x = _x(shape=(2, 3, 6, 7))
    xl = x.to(memory_format=torch.channels_last)
    assert not xl.is_contiguous()
    sources = []
    for name in ("gather_patches", "gather_patch_columns"):  # rows, or F.unfold's columns (fast path)
        gather = getattr(chunkconv.gather, name)
        monkeypatch.setattr(
            chunkconv.gather, name, lambda src, *a, gather=gather: (sources.append(src), gather(src, *a))[1]
        )
    x1, x2 = x.clone().requires_grad_(), xl.clone().requires_grad_()
    y1, y2 = conv(x1), conv(x2)
    assert torch.equal(y1, y2)
    up = torch.randn_like(y1)
    for g1, g2 in zip(_grads(y1, [x1, *conv.parameters()], up), _grads(y2, [x2, *conv.parameters()], up)):
        assert torch.equal(g1, g2)
    if padding == 0:  # the patches are read straight from the channels-last input: no copy of it
        assert any(s.data_ptr() == x2.data_ptr() and s.stride() == x2.stride() for s in sources)


def _packed_during(fn):
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, packed


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode_save_nothing(mode):
    conv = _conv()
    x = _x(requires_grad=True)
    with mode():
        y, packed = _packed_during(lambda: conv(x))
    assert packed == [] and y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, _reference(conv, x).detach())


def test_input_without_grad_trains_the_generator_and_bias():
    conv = _conv()
    x = _x()
    y, want = conv(x), _reference(conv, x)
    params = list(conv.parameters())
    up = torch.randn_like(y)
    for g, w in zip(_grads(y, params, up), _grads(want, params, up)):
        torch.testing.assert_close(g, w)


def test_frozen_generator():
    conv = _conv()
    conv.generator.requires_grad_(False)
    x = _x(requires_grad=True)
    y, want = conv(x), _reference(conv, x)
    up = torch.randn_like(y)
    for g, w in zip(_grads(y, [x, conv.bias], up), _grads(want, [x, conv.bias], up)):
        torch.testing.assert_close(g, w)
    conv(x).backward(up)
    assert x.grad is not None and all(p.grad is None for p in conv.generator.parameters())
    # nothing trainable and an input without grad: no graph at all, nothing saved
    conv.requires_grad_(False)
    y, packed = _packed_during(lambda: conv(_x()))
    assert y.grad_fn is None and packed == []


def test_generator_is_a_submodule_the_optimizer_trains():
    gen = mlp_generator(SPEC, hidden=6)
    conv = chunkconv.DynamicConv(gen, 3, 4, 3, padding=1, chunk_size=7, dtype=torch.float64)
    assert dict(conv.named_modules())["generator"] is gen
    assert {id(p) for p in conv.parameters()} == {id(conv.bias), *(id(p) for p in gen.parameters())}
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    before = [p.detach().clone() for p in gen.parameters()]
    x = _x()
    conv(x).square().sum().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, gen.parameters()))
    conv.eval()
    assert not gen.training
