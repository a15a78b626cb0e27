"""The planner is arithmetic over made-up costs: no tensor, no generator, no probe."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chunkconv.errors import BudgetTooSmallError
from chunkconv.geometry import conv_spec
from chunkconv.measure import ChunkCost, StepCost
from chunkconv.planner import SAFETY_FACTOR, PlanRequest, fixed_costs, make_plan, safety_bytes

CPU = torch.device("cpu")
GEOM = conv_spec(2, in_channels=8, out_channels=4, kernel_size=3, padding=1).geometry((1, 8, 128, 128))


class TrueCosts:
    """A step whose real bytes are ``fixed + per_patch * B``; the planner sees only the probes it asks for."""

    def __init__(self, fixed, per_patch, probes=(2, 4), training=True):
        self.fixed, self.per_patch, self.training = fixed, per_patch, training
        self.probes, self.extended = probes, []

    def _at(self, sizes):
        pts = tuple((b, self.fixed + self.per_patch * b) for b in sizes)
        return ChunkCost(StepCost(pts), StepCost(pts) if self.training else None, "made up")

    def measure(self, limit):
        return self._at(self.probes)

    def extend(self, cost, patches):
        self.extended.append(patches)
        return cost.merged(self._at((patches,)))

    def reference(self, limit):
        return None


def _request(budget, training=True, chunk_size=None):
    return PlanRequest(GEOM, torch.float32, torch.float32, CPU, training, True, budget=budget, chunk_size=chunk_size)


def _true_peak(request, costs, size):
    fwd, bwd = fixed_costs(request)
    fixed = max(sum(fwd.values()), sum(bwd.values())) if request.training else sum(fwd.values())
    return fixed + costs.fixed + costs.per_patch * size


@given(
    fixed=st.integers(0, 2_000_000),
    per_patch=st.integers(1, 20_000),
    factor=st.floats(1.0, 50.0),
    training=st.booleans(),
)
def test_chosen_chunks_fit_by_the_true_costs_and_every_probe_does_too(fixed, per_patch, factor, training):
    # two tiny probes give a line; the true cost may have a large fixed part (defect: a flat line
    # chose a huge chunk, then probed it with no limit)
    costs = TrueCosts(fixed, per_patch, training=training)
    probe_request = _request(2**60, training)
    minimum = make_plan(probe_request, TrueCosts(fixed, per_patch, training=training)).minimum_budget
    budget = int(minimum * factor)
    plan = make_plan(_request(budget, training), costs)
    request = _request(budget, training)
    assert SAFETY_FACTOR * _true_peak(request, costs, plan.chunk_size) + safety_bytes(CPU) <= budget * 1.0001
    for size in costs.extended:  # every extra probe, run inside the call, fits the budget too
        assert costs.fixed + costs.per_patch * size <= budget
    assert plan.num_chunks == math.ceil(GEOM.num_patches / plan.chunk_size)


@given(factors=st.lists(st.floats(1.0, 100.0), min_size=2, max_size=5))
def test_a_larger_budget_never_means_more_chunks(factors):
    minimum = make_plan(_request(2**60), TrueCosts(50_000, 3_000)).minimum_budget
    budgets = sorted(int(minimum * f) for f in factors)
    chunks = [make_plan(_request(b), TrueCosts(50_000, 3_000)).num_chunks for b in budgets]
    assert chunks == sorted(chunks, reverse=True)


def test_one_byte_below_the_minimum_raises_and_the_minimum_plans():
    minimum = make_plan(_request(2**60), TrueCosts(10_000, 100)).minimum_budget
    with pytest.raises(BudgetTooSmallError) as info:
        make_plan(_request(minimum - 1), TrueCosts(10_000, 100))
    assert info.value.minimum == minimum
    assert make_plan(_request(minimum), TrueCosts(10_000, 100)).chunk_size == 1


def test_chunk_size_given_needs_no_measurement():
    class Nothing:
        def measure(self, limit):
            raise AssertionError("measured")

    request = dataclasses.replace(_request(None, chunk_size=100), estimate=False)
    plan = make_plan(request, Nothing())
    assert plan.chunk_size == 100 and plan.cost is None and plan.reason == "chunk_size given"


@given(
    per_patch=st.integers(1, 20_000),
    factors=st.lists(st.floats(1.0, 200.0), min_size=2, max_size=5),
    layout=st.sampled_from(["rows", "columns"]),
)
def test_column_layout_chunks_are_whole_rows_within_the_budget(per_patch, factors, layout):
    # the "columns" patch layout may plan chunks of whole output rows: still within the budget,
    # still no more chunks for a larger budget; the rows layout never does
    def request(budget):
        return dataclasses.replace(_request(budget), patch_layout=layout)

    minimum = make_plan(request(2**60), TrueCosts(50_000, per_patch)).minimum_budget
    chunks = []
    for budget in sorted(int(minimum * f) for f in factors):
        costs = TrueCosts(50_000, per_patch)
        plan = make_plan(request(budget), costs)
        assert (
            SAFETY_FACTOR * _true_peak(request(budget), costs, plan.chunk_size) + safety_bytes(CPU) <= budget * 1.0001
        )
        if "in whole rows" in plan.reason:
            assert layout == "columns" and plan.chunk_size % GEOM.out_spatial[-1] == 0
        chunks.append(plan.num_chunks)
    assert chunks == sorted(chunks, reverse=True)


class _Linear:
    """A peak model of exactly 100 bytes per patch (``choose_chunk_size`` needs no more)."""

    def required(self, patches):
        return 100 * patches

    def per_patch(self):
        return 100.0


@pytest.mark.parametrize(
    ("fits", "reason"),
    [
        (10 * 128 + 64, True),  # 10.5 rows fit: whole rows lose under 5%
        (128 + 64, False),  # 1.5 rows fit: one row would lose a third; evened-out patches instead
        (100, False),  # under a row: no rows to align to
    ],
)
def test_whole_rows_are_taken_only_where_they_cost_little(fits, reason):
    from chunkconv.planner import choose_chunk_size

    total, row = 128 * 128, 128
    size, why = choose_chunk_size(_Linear(), total, 100 * fits, torch.device("meta"), row)
    assert ("in whole rows" in why) is reason
    assert size <= fits and (size % row == 0) is reason
    if reason:
        assert size == 10 * row  # 128 rows in 13 chunks of at most 10 rows, evened out
    else:
        assert size == math.ceil(total / math.ceil(total / fits))
    assert choose_chunk_size(_Linear(), total, 100 * fits, torch.device("meta"))[0] == math.ceil(
        total / math.ceil(total / fits)
    )  # without a row: as before
