"""The public signatures agree with each other and with ``CallOptions`` (issue 18, item 5).

The convolution's arguments and the call options are written out in each entry point's
signature, as torch writes them in ``F.conv2d`` and ``nn.Conv2d``, so that help and completion
show them; the options are then built from the arguments by name
(:meth:`CallOptions.from_arguments`). These tests are what keeps the copies one definition: a
new option, a renamed keyword or a changed default in one place fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch
from torch import nn

import chunkconv
from chunkconv.call import CallOptions
from chunkconv.functional import apply_spec, plan_spec

OPTIONS = {f.name: f.default for f in dataclasses.fields(CallOptions)}
FUNCTIONS = [chunkconv.dynamic_conv, chunkconv.dynamic_conv1d, chunkconv.dynamic_conv2d, chunkconv.dynamic_conv3d]
# per-call tensors: the side inputs and a deformable call's offsets and mask
PER_CALL = ("features", "guide", "offsets", "mask")
CONV = ("stride", "padding", "dilation", "groups", "padding_mode")


def _params(fn: object) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "entry", [*FUNCTIONS, chunkconv.plan, chunkconv.DynamicConv.__init__], ids=lambda f: f.__qualname__
)
def test_every_entry_point_takes_every_option_by_keyword_with_its_default(entry):
    params = _params(entry)
    expected = dict(OPTIONS)
    if entry is chunkconv.plan:
        del expected["progress"]  # nothing runs
    for name, default in expected.items():
        assert name in params, f"{entry.__qualname__} lacks the option `{name}`"
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (entry.__qualname__, name)
        assert params[name].default == default, (entry.__qualname__, name, params[name].default, default)
    assert "progress" not in params or entry is not chunkconv.plan


def test_the_functions_and_plan_share_the_convolution_arguments_and_per_call_tensors():
    reference = _params(chunkconv.dynamic_conv2d)
    conv_args = ["input", "generator", "out_channels", "kernel_size", "bias", *CONV[:4]]
    for entry in (*FUNCTIONS, chunkconv.plan):
        params = _params(entry)
        assert list(params)[: len(conv_args)] == conv_args, entry.__qualname__
        for name in (*conv_args, "padding_mode", "weight", *PER_CALL):
            assert params[name].default == reference[name].default, (entry.__qualname__, name)
        assert [p for p in params if params[p].kind is not inspect.Parameter.KEYWORD_ONLY] == conv_args


def test_the_module_takes_nn_conv2ds_arguments_in_its_order_and_the_call_tensors_at_forward():
    ours, torchs = _params(chunkconv.DynamicConv.__init__), _params(nn.Conv2d.__init__)
    positional = [p for p in ours if ours[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == ["self", "generator", *[p for p in torchs if p != "self"]]
    for name in torchs:
        if name not in ("self", "kernel_size", "in_channels", "out_channels"):
            assert ours[name].default == torchs[name].default, name
    forward = _params(chunkconv.DynamicConv.forward)
    assert [p for p in forward if forward[p].kind is inspect.Parameter.KEYWORD_ONLY] == list(PER_CALL)
    for inner in (apply_spec, plan_spec):
        assert set(PER_CALL) <= set(_params(inner)), inner.__qualname__


@pytest.mark.parametrize("entry", [chunkconv.dynamic_conv2d, chunkconv.DynamicConv], ids=lambda f: f.__name__)
def test_every_option_and_per_call_tensor_is_documented(entry):
    doc = inspect.getdoc(entry) or ""
    for name in (*OPTIONS, *(PER_CALL if entry is not chunkconv.DynamicConv else ())):
        assert re.search(rf"^ +{name}: ", doc, re.MULTILINE), (entry.__name__, name)


def test_options_are_built_from_the_arguments_by_name():
    # every field reaches the options from each entry point, including a bare kind for `inputs`
    gen = nn.Linear(9, 9)
    conv = chunkconv.DynamicConv2d(gen, 1, 1, 3, padding=1, budget="64MB", chunk_size=7, path="generic",
                                   inputs="patches", progress=False, sampling_rule="strict")  # fmt: skip
    assert conv.options == CallOptions(budget="64MB", chunk_size=7, path="generic", progress=False,
                                       sampling_rule="strict")  # fmt: skip
    plan = chunkconv.plan((1, 1, 8, 8), gen, 1, 3, padding=1, chunk_size=5, path="generic", inputs="patches")
    assert plan.chunk_size == 5
    x = torch.randn(1, 1, 8, 8)
    y = chunkconv.dynamic_conv2d(x, gen, 1, 3, padding=1, chunk_size=5, inputs="patches")
    torch.testing.assert_close(y, conv(x) - conv.bias.view(1, -1, 1, 1))
    with pytest.raises(TypeError, match=r"Invalid type for `inputs`"):
        CallOptions.from_arguments({"inputs": 5})
