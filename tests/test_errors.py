"""Bad input: a clear error before any work, and nothing the user passed is changed."""

import re

import pytest
import torch
from torch import nn

import chunkconv
from chunkconv.geometry import conv_spec
from chunkconv.testing import mlp_generator


def _gen(cin=4, cout=6, k=3, groups=1, dtype=torch.float64):
    return mlp_generator(conv_spec(2, in_channels=cin, out_channels=cout, kernel_size=k, groups=groups), dtype=dtype)


class _Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (dict(kernel_size=(3, 3, 3, 3)), ValueError, r"^Invalid value for `kernel_size`; expected 1, 2 or 3"),
        (
            dict(kernel_size=0),
            ValueError,
            r"^Invalid value for `kernel_size`; expected an int or a tuple of 2 ints >= 1",
        ),
        (dict(kernel_size=3.0), TypeError, r"^Invalid type for `kernel_size`"),
        (dict(stride=(1, 0)), ValueError, r"^Invalid value for `stride`"),
        (dict(padding=-1), ValueError, r"^Invalid value for `padding`"),
        (dict(padding="full"), ValueError, r"^Invalid value for `padding`; expected 'same', 'valid'"),
        (dict(padding="same", stride=2), ValueError, r"^padding='same' is not supported for strided convolutions"),
        (dict(dilation=(1, 2, 3)), ValueError, r"^Invalid value for `dilation`"),
        (dict(groups=0), ValueError, r"^Invalid value for `groups`"),
        (dict(groups=3), ValueError, r"^`in_channels` must be divisible by `groups`; got in_channels=4, groups=3"),
        (dict(padding_mode="mirror"), ValueError, r"^Invalid value for `padding_mode`"),
        (dict(out_channels=0), ValueError, r"^Invalid value for `out_channels`"),
        (dict(in_channels=True), TypeError, r"^Invalid type for `in_channels`"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, exc, pattern):
    args = dict(in_channels=4, out_channels=6, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        chunkconv.DynamicConv(_gen(), **args)


def test_out_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match=r"^`out_channels` must be divisible by `groups`; got out_channels=3"):
        chunkconv.DynamicConv(_gen(), 4, 3, 3, groups=2)


def test_generator_must_be_callable():
    with pytest.raises(TypeError, match=r"^Invalid type for `generator`"):
        chunkconv.DynamicConv(42, 4, 6, 3)


def _conv(gen, **kw):
    args = dict(kernel_size=3, padding=1, dtype=torch.float64)
    args.update(kw)
    return chunkconv.DynamicConv(gen, 4, 6, **args)


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        (
            (2, 3, 8, 8),
            r"^Expected input with 4 channels \(in_channels=4\), got 3 channels in input of shape \(2, 3, 8, 8\)",
        ),
        ((4, 8), r"^Expected 3-D \(unbatched\) or 4-D \(batched\) input to DynamicConv, got input of shape \(4, 8\)"),
        ((2, 4, 8), r"^Expected input with 4 channels \(in_channels=4\), got 2 channels in input of shape \(2, 4, 8\)"),
        ((2, 4, 8, 8, 8), r"^Expected 3-D \(unbatched\) or 4-D"),
    ],
)
def test_bad_input_shapes(shape, pattern):
    gen = _Counting(_gen())
    with pytest.raises(ValueError, match=pattern):
        _conv(gen)(torch.randn(shape, dtype=torch.float64))
    assert gen.calls == 0


def test_kernel_larger_than_padded_input():
    gen = _Counting(_gen())
    with pytest.raises(ValueError, match=r"^Kernel larger than the padded input: the receptive field \(5, 5\)"):
        _conv(gen, dilation=2, padding=0)(torch.randn(1, 4, 4, 9, dtype=torch.float64))
    assert gen.calls == 0


@pytest.mark.parametrize(("mode", "rel"), [("reflect", "<"), ("circular", "<=")])
def test_padding_larger_than_mode_allows(mode, rel):
    with pytest.raises(ValueError, match=rf"^padding_mode='{mode}' needs padding {rel} the input size"):
        chunkconv.DynamicConv(_gen(k=1), 4, 6, 1, padding=3, padding_mode=mode).double()(
            torch.randn(1, 4, 2, 5, dtype=torch.float64)
        )


def test_generator_output_of_wrong_size_names_both_shapes():
    bad = nn.Sequential(nn.Linear(36, 8), nn.Linear(8, 5)).double()
    with pytest.raises(chunkconv.GeneratorOutputError, match=re.escape("expected shape (7, 6, 4, 3, 3) or (7, 216)")):
        _conv(bad, chunk_size=7)(torch.randn(1, 4, 5, 5, dtype=torch.float64))


def test_generator_returning_non_tensor():
    with pytest.raises(chunkconv.GeneratorOutputError, match=r"got tuple"):
        _conv(lambda p: (p,))(torch.randn(1, 4, 5, 5, dtype=torch.float64))


def test_generator_dtype_mismatch():
    gen = _Counting(_gen(dtype=torch.float32))
    with pytest.raises(
        ValueError,
        match=r"^The generator's 'inner.0.weight' has dtype torch.float32 but the input has dtype torch.float64",
    ):
        _conv(gen)(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    assert gen.calls == 0


def test_generator_device_mismatch():
    gen = _gen().to("meta")
    with pytest.raises(ValueError, match=r"^The generator's '0.weight' is on meta but the input is on cpu"):
        _conv(gen)(torch.randn(1, 4, 5, 5, dtype=torch.float64))


def test_integer_input():
    with pytest.raises(TypeError, match=r"^Expected a floating-point input to DynamicConv, got dtype torch.int64"):
        _conv(_gen())(torch.ones(1, 4, 5, 5, dtype=torch.long))


def test_bad_chunk_size():
    with pytest.raises(ValueError, match=r"^Invalid value for `chunk_size`"):
        _conv(_gen(), chunk_size=0)
    with pytest.raises(ValueError, match=r"^Invalid value for `chunk_size`"):
        chunkconv.dynamic_conv2d(torch.randn(1, 4, 5, 5, dtype=torch.float64), _gen(), 6, 3, chunk_size=-2)


def test_bad_bias_shape():
    with pytest.raises(ValueError, match=r"^Invalid shape for `bias`; expected \(6,\)"):
        chunkconv.dynamic_conv2d(torch.randn(1, 4, 5, 5, dtype=torch.float64), _gen(), 6, 3, bias=torch.zeros(5))


@pytest.mark.parametrize(
    ("module", "why"),
    [
        (nn.BatchNorm1d(8), r"BatchNorm1d \(at 'inner.1'\) is in training mode"),
        (nn.BatchNorm1d(8, track_running_stats=False).eval(), r"track_running_stats=False"),
    ],
)
def test_batch_coupled_generator_refused(module, why):
    gen = _Counting(nn.Sequential(nn.Linear(36, 8), module, nn.Linear(8, 216)).double())
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with pytest.raises(
        chunkconv.BatchCoupledGeneratorError, match=rf"mixes patches of one call: .*{why}.*eval mode.*LayerNorm"
    ):
        _conv(gen)(x)
    assert gen.calls == 0
    # opting in runs it; eval mode (running stats) is per-patch and accepted as is
    _conv(gen, allow_batch_coupled=True)(x)
    if module.track_running_stats:
        gen.eval()
        _conv(gen)(x)


def test_input_and_generator_untouched():
    gen = _gen()
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    x_copy = x.detach().clone()
    conv = _conv(gen, padding_mode="reflect", chunk_size=5)
    conv(x).sum().backward()
    assert torch.equal(x.detach(), x_copy)
    assert x._version == 0
    for k, v in gen.state_dict().items():
        assert torch.equal(v, before[k])


def test_empty_batch_returns_empty_output_like_torch():
    gen = _gen()
    x = torch.randn(0, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    conv = _conv(gen)
    y = conv(x)
    assert y.shape == (0, 6, 6, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is None or not p.grad.any() for p in gen.parameters())
    # like nn.Conv2d: every parameter that took part gets a (zero) gradient, not None
    assert all(p.grad is not None and not p.grad.any() for p in gen.parameters())
    assert conv.bias.grad is not None and not conv.bias.grad.any()


def test_function_closing_over_a_module_is_refused_before_training():
    # a lambda over a Linear: the layer's parameters would be only its bias, and lin would
    # silently get no gradient; refused, with what to do
    lin = nn.Linear(36, 216).double()
    conv = chunkconv.DynamicConv2d(lambda p: lin(p), 4, 6, 3, dtype=torch.float64)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"closes over.*pass the module itself as the generator"):
        conv(x)
    with torch.no_grad():  # nothing to train: allowed
        assert conv(x).shape == (1, 6, 3, 3)
    # a function that uses no tensor needing grad stays allowed while training
    lin.requires_grad_(False)
    conv(x.requires_grad_()).sum().backward()
    assert x.grad is not None


def test_generator_answering_in_another_dtype_names_both_dtypes():
    gen = nn.Sequential(nn.Linear(36, 8), nn.Linear(8, 216)).double()
    conv = chunkconv.DynamicConv2d(lambda p: gen(p.double()), 4, 6, 3, chunk_size=5)
    with pytest.raises(chunkconv.GeneratorOutputError, match=r"expected torch.float32 .*got torch.float64"):
        conv(torch.randn(1, 4, 5, 5))
    fast = nn.Sequential(_Double(), nn.Linear(36, 216))  # the body answers in float64
    conv = chunkconv.DynamicConv2d(fast, 4, 6, 3, chunk_size=5, path="fast")
    with pytest.raises(chunkconv.GeneratorOutputError, match=r"got torch.float64"):
        conv(torch.randn(1, 4, 5, 5))


class _Double(nn.Module):
    def forward(self, p):
        return p.double()
