"""Micro-batch planning: hand-derived LPT plans, invariants on random lengths, errors."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vespo_megatron.packing import plan_micro_batches

LENS = [5, 3, 8, 1, 9, 2, 7, 4]  # padded to 2: costs [6, 4, 8, 2, 10, 2, 8, 4]


def test_hand_plan_by_budget():
    # LPT over 2 ranks, order 4(10) 2(8) 6(8) 0(6) 1(4) 7(4) 3(2) 5(2): rank 0 = {4, 0, 1, 3}, rank 1 = {2, 6, 7, 5},
    # 22 tokens each -> k = ceil(22 / 12) = 2; rank 0: {4, 3} 12, {0, 1} 10; rank 1: {2, 7} 12, {6, 5} 10.
    plan = plan_micro_batches(LENS, dp=2, max_tokens=12)
    assert plan.micro_batches == [[[0, 1], [3, 4]], [[2, 7], [5, 6]]]
    np.testing.assert_array_equal(plan.tokens(), [[10, 12], [12, 10]])


def test_hand_plan_by_count_with_cp():
    # cp = 2 pads to 4: costs [8, 4, 8, 4, 12, 4, 8, 4]; 4 samples per rank.
    # ranks (capacity 4): 4->r0 12, 0->r1 8, 2->r1 16, 6->r0 20, 1->r1 20, 3->r0 24, 5->r1 24 (full), 7->r0 28.
    # micro_batch_size 3 -> k = 2 micro-batches of 2: r0 order 4 6 3 7 -> {4, 7}, {6, 3}; r1 0 2 1 5 -> {0, 1}, {2, 5}.
    plan = plan_micro_batches(LENS, dp=2, micro_batch_size=3, cp=2)
    assert plan.micro_batches == [[[3, 6], [4, 7]], [[0, 1], [2, 5]]]
    np.testing.assert_array_equal(plan.tokens(), [[12, 16], [12, 12]])


@settings(max_examples=150, deadline=None)
@given(
    lens=st.lists(st.integers(0, 300), min_size=4, max_size=40),
    dp=st.sampled_from([1, 2, 4]),
    budget=st.integers(300, 1200),
    cp=st.sampled_from([1, 2]),
)
def test_budget_plan_invariants(lens, dp, budget, cp):
    plan = plan_micro_batches(lens, dp, max_tokens=budget, cp=cp)
    again = plan_micro_batches(lens, dp, max_tokens=budget, cp=cp)
    assert plan.micro_batches == again.micro_batches  # deterministic
    flat = [i for rank in plan.micro_batches for mb in rank for i in mb]
    assert sorted(flat) == list(range(len(lens)))  # every sample exactly once
    assert len({len(rank) for rank in plan.micro_batches}) == 1  # same number of micro-batches on every rank
    assert plan.tokens().max() <= budget
    costs = -(-np.array(lens) // (2 * cp)) * 2 * cp
    loads = plan.tokens().sum(axis=1)
    assert loads.max() - loads.min() <= costs.max()  # LPT balance bound across DP ranks


@settings(max_examples=100, deadline=None)
@given(per_rank=st.integers(1, 12), dp=st.sampled_from([1, 2, 4]), mbs=st.integers(1, 5), seed=st.integers(0, 99))
def test_count_plan_invariants(per_rank, dp, mbs, seed):
    lens = np.random.default_rng(seed).integers(1, 500, per_rank * dp)
    plan = plan_micro_batches(lens, dp, micro_batch_size=mbs)
    for rank in plan.micro_batches:
        sizes = [len(mb) for mb in rank]
        assert sum(sizes) == per_rank and len(sizes) == -(-per_rank // mbs)
        assert max(sizes) <= mbs and max(sizes) - min(sizes) <= 1
    flat = [i for rank in plan.micro_batches for mb in rank for i in mb]
    assert sorted(flat) == list(range(lens.size))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_lens": [3, -1], "max_tokens": 8}, "sample 1: length -1 < 0"),
        ({"seq_lens": [3, 9], "max_tokens": 8}, "sample 1: 10 padded tokens exceed max_tokens=8"),
        ({"seq_lens": [3, 4]}, "give exactly one of"),
        ({"seq_lens": [3, 4], "max_tokens": 8, "micro_batch_size": 2}, "give exactly one of"),
        ({"seq_lens": [3, 4, 5], "dp": 2, "micro_batch_size": 1}, "3 samples are not divisible by dp=2"),
        ({"seq_lens": [3], "dp": 2, "max_tokens": 8}, "1 samples cannot fill 2 data-parallel ranks"),
        ({"seq_lens": [3], "micro_batch_size": 0}, "micro_batch_size must be >= 1"),
    ],
)
def test_planning_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_micro_batches(**kwargs)
