"""A layer holds one options object: keyword-only options, properties that replace it, read-only form."""

import dataclasses

import pytest
import torch
from torch import nn

import chunkconv
from chunkconv.call import CallOptions


def _conv(**kwargs):
    return chunkconv.DynamicConv2d(nn.Linear(2 * 9, 3 * 2 * 9), 2, 3, 3, padding=1, **kwargs)


def test_options_after_the_convolutions_arguments_are_keyword_only():
    gen = nn.Linear(2 * 9, 3 * 2 * 9)
    with pytest.raises(TypeError):
        chunkconv.DynamicConv2d(gen, 2, 3, 3, 1, 1, 1, 1, True, "zeros", None, None, "1GB")
    with pytest.raises(TypeError):
        CallOptions("1GB")  # built by keyword only
    assert _conv(budget="1GB").budget == "1GB"


def test_settable_options_replace_the_one_options_object_and_are_checked_when_set():
    conv = _conv(chunk_size=5)
    before = conv.options
    conv.budget = "64MB"
    conv.chunk_size = None
    conv.path = "generic"
    assert conv.options == dataclasses.replace(before, budget="64MB", chunk_size=None, path="generic")
    assert before.chunk_size == 5  # replaced, not mutated
    with pytest.raises(ValueError, match="path"):
        conv.path = "fastest"
    with pytest.raises(ValueError, match="chunk_size"):
        conv.chunk_size = 0
    assert conv.path == "generic"
    y = conv(torch.randn(1, 2, 6, 6))
    assert conv.plan((1, 2, 6, 6), training=False).path.path == "generic"
    assert y.shape == (1, 3, 6, 6)


def test_the_kernel_form_and_the_generators_inputs_are_read_only():
    conv = _conv()
    for name, value in (("kernel", "shared"), ("inputs", ("patches", "positions")), ("kernel_groups", 2)):
        with pytest.raises(AttributeError):
            setattr(conv, name, value)
    assert (conv.kernel, conv.inputs, conv.kernel_groups) == ("full", ("patches",), None)


def test_mlp_generator_takes_a_layer_of_the_top_level():
    from chunkconv.testing import mlp_generator

    conv = chunkconv.DynamicConv2d(nn.Identity(), 4, 6, (3, 5), groups=2)
    gen = mlp_generator(conv, hidden=5)
    assert (gen[0].in_features, gen[-1].out_features) == (4 * 15, 6 * 2 * 15)
