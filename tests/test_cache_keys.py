"""The plan and cost caches use typed keys; the shape-free part is shared between input sizes."""

import torch
from torch import nn

import chunkconv
from chunkconv import measure
from chunkconv.measure import CallKey, CostKey, PlanKey, generator_cache


def test_caches_hold_typed_keys_and_share_the_measurement_between_sizes(monkeypatch):
    gen = nn.Sequential(nn.Linear(2 * 9, 4), nn.ReLU(), nn.Linear(4, 3 * 2 * 9))
    conv = chunkconv.DynamicConv2d(gen, 2, 3, 3, padding=1, budget="64MB", path="generic")
    conv.plan((1, 2, 16, 16), training=True)
    conv.plan((2, 2, 24, 20), training=True)
    cache = generator_cache(gen)
    costs = [k for k in cache if isinstance(k, CostKey)]
    plans = [k for k in cache if isinstance(k, PlanKey)]
    assert all(isinstance(k, CostKey | PlanKey) for k in cache)
    assert len(plans) == 2 and plans[0].geom != plans[1].geom and plans[0].call == plans[1].call
    assert len(costs) == 1 and isinstance(costs[0].call, CallKey) and costs[0].training
    # an inference plan reuses the training measurement's forward instead of probing again
    calls = []
    real = measure.measure_step_cost
    monkeypatch.setattr(measure, "measure_step_cost", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        conv.plan((1, 2, 16, 16), training=False)
    assert calls == []
