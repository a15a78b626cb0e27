"""Nothing chunkconv keeps holds on to a generator the user dropped."""

import gc
import weakref

import torch
from torch import nn

import chunkconv


def _train_once(gen, budget="64MB"):
    conv = chunkconv.DynamicConv2d(gen, 2, 3, 3, padding=1, budget=budget)
    x = torch.randn(1, 2, 12, 12, requires_grad=True)
    conv(x).sum().backward()
    with torch.no_grad():
        conv(x)
    print(conv.plan(x))  # a plan made to be read (estimates, the generic reference) is cached too
    return weakref.ref(gen), weakref.ref(conv)


def test_a_bare_linear_generator_is_freed_after_forward_and_backward():
    # the defect: the cached Plan held path.tail.linear, which for a bare nn.Linear is the
    # cache's own weak key, so it (and its layer) never died
    gen_ref, conv_ref = _train_once(nn.Linear(18, 3 * 18))
    gc.collect()
    assert gen_ref() is None and conv_ref() is None


def test_mlp_and_generic_generators_are_freed():
    makers = (
        lambda: nn.Sequential(nn.Linear(18, 4), nn.ReLU(), nn.Linear(4, 54)),  # fast path
        lambda: nn.Sequential(nn.Linear(18, 54), nn.Tanh()),  # generic path
    )
    for make in makers:
        gen_ref, conv_ref = _train_once(make())
        gc.collect()
        assert gen_ref() is None and conv_ref() is None


def test_plans_hold_plain_data_only():
    gen = nn.Linear(18, 54)
    plan = chunkconv.plan((1, 2, 12, 12), gen, 3, 3, padding=1, budget="64MB")
    seen, stack = set(), [plan]
    while stack:  # walk every attribute of the plan: no module, no tensor
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        assert not isinstance(obj, (nn.Module, torch.Tensor)), type(obj)
        if hasattr(obj, "__dataclass_fields__"):
            stack += [getattr(obj, f) for f in obj.__dataclass_fields__]
        elif isinstance(obj, (tuple, list)):
            stack += list(obj)
        elif isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
