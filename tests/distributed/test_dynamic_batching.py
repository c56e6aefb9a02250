"""Dynamic batching (``--use-dynamic-batch-size --max-tokens-per-gpu``) keeps the loss the exact global token-mean:
micro-batches cut by a token budget give the same per-mini-batch loss and gradients as fixed micro-batches of
``--micro-batch-size`` samples and as the 1-rank run (fp64, ≤ 1e-10), on 2 gloo ranks as data parallel 2 and as
expert parallel 2 (whose all-to-alls need every rank to run the same number of micro-batches: the plan gives each
data-parallel rank the same count, none empty). The micro-batches go through the trainer's own path:
``plan_shares`` -> ``build_micro_batches`` -> ``old_log_probs`` -> ``forward_backward``."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch

from tests.distributed.parallel_cases import make_samples, weights_rank
from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.megatron.loss import LossSettings
from vespo_megatron.megatron.model import build_model
from vespo_megatron.megatron.parallel import init_parallel, ranks, spawn
from vespo_megatron.megatron.step import forward_backward, old_log_probs, wrap_ddp, zero_grads
from vespo_megatron.megatron.weights import export_global, load_global
from vespo_megatron.train.delivery import RankPlace, build_micro_batches, plan_shares

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
FAMILY, DTYPE, TOL = "qwen3_moe", torch.float64, 1e-10
N_MINI, MBS, BUDGET = 2, 2, 16  # 16 samples: 2 mini-batches of 8; fixed: 2 samples per micro-batch


def samples():
    lengths = [(2, 1), (6, 9), (3, 2), (5, 8), (2, 3), (4, 9), (6, 1), (2, 2),
               (3, 9), (2, 1), (6, 7), (4, 4), (2, 6), (5, 2), (3, 3), (6, 9)]
    return make_samples(16, seed=11, lengths=lengths)


def run_plans(rank: int, layout: dict, weights: dict, data: list, budgets: list[Optional[int]]) -> list[list[dict]]:
    """Per budget (None: fixed micro-batches), per mini-batch: loss (this rank's share), its micro-batches' padded
    token counts and the global gradients after the mini-batch's forward-backward."""
    init_parallel(**layout)
    model = build_model(tiny_hf_config(FAMILY), dtype=DTYPE)
    load_global(model, weights)
    ddp = wrap_ddp(model)
    r = ranks()
    place = RankPlace(r.dp_rank, r.tp_rank, (), r.cp_rank)
    out = []
    for budget in budgets:
        minis = plan_shares(data, None, N_MINI, r.dp, r.tp, MBS, place, cp=r.cp, max_tokens=budget)
        per_mini = []
        for mini in minis:
            zero_grads(ddp)
            mbs = build_micro_batches(mini, r.cp, r.cp_rank, r.tp, r.tp_rank)
            mbs = [mb.with_old_log_prob(old) for mb, old in zip(mbs, old_log_probs(ddp, mbs))]
            metrics = forward_backward(ddp, mbs, LossSettings(name="vespo", old_from_rollout=True))
            per_mini.append({"loss": float(sum(m["loss"] for m in metrics)),
                             "tokens": [int(mb.tokens.numel()) for mb in mbs],
                             "grads": export_global(model, grads=True)})
        out.append(per_mini)
    return out


@pytest.fixture(scope="module")
def reference():
    weights = spawn(weights_rank, 1, FAMILY, DTYPE)[0]
    data = samples()
    one_rank = spawn(run_plans, 1, {}, weights, data, [None])[0][0]
    return weights, data, one_rank


def _check(ranks_out: list[list[dict]], one_rank: list[dict]) -> None:
    for k, ref in enumerate(one_rank):
        loss = sum(rank_out[k]["loss"] for rank_out in ranks_out)
        assert abs(loss - ref["loss"]) <= TOL * max(1.0, abs(ref["loss"])), (k, loss, ref["loss"])
        grads = ranks_out[0][k]["grads"]
        assert sorted(grads) == sorted(ref["grads"])
        for key, g in ref["grads"].items():
            assert torch.allclose(grads[key], g, atol=TOL, rtol=0), (k, key)


def test_reference_is_not_trivial(reference):
    _, _, one_rank = reference
    assert all(ref["loss"] != 0.0 for ref in one_rank)
    assert all(max(g.abs().max() for g in ref["grads"].values()) > 1e-6 for ref in one_rank)


@pytest.mark.parametrize("layout", [dict(), dict(ep=2)], ids=["dp2", "ep2"])
def test_token_budget_equals_fixed_micro_batches_and_one_rank(reference, layout):
    weights, data, one_rank = reference
    fixed, dynamic = zip(*spawn(run_plans, 2, layout, weights, data, [None, BUDGET]))
    _check(list(fixed), one_rank)
    _check(list(dynamic), one_rank)
    for k in range(N_MINI):
        counts = {len(rank_out[k]["tokens"]) for rank_out in dynamic}
        assert len(counts) == 1, counts  # every rank runs the same number of micro-batches
        assert all(0 < t <= BUDGET for rank_out in dynamic for t in rank_out[k]["tokens"])
        # the budget really changes the split: fewer or more micro-batches than 2 samples each
        assert counts != {len(fixed[0][k]["tokens"])}


def test_plan_has_no_empty_micro_batch_and_same_count_per_rank():
    """The planner's equal-count budget mode on many random batches: k micro-batches on every rank, none empty,
    each within the budget, every sample once."""
    from vespo_megatron.packing import plan_micro_batches

    rng = np.random.default_rng(0)
    for _ in range(200):
        dp = int(rng.integers(1, 5))
        lens = rng.integers(1, 40, dp * int(rng.integers(1, 9)))
        budget = int(rng.integers(40, 120))
        plan = plan_micro_batches(lens, dp, max_tokens=budget, cp=int(rng.integers(1, 3)), equal_counts=True)
        assert all(len(rank) == plan.num_micro_batches for rank in plan.micro_batches)
        assert all(mb for rank in plan.micro_batches for mb in rank)
        assert (plan.tokens() <= budget).all()
        assert sorted(i for rank in plan.micro_batches for mb in rank for i in mb) == list(range(len(lens)))
        assert len({sum(len(mb) for mb in rank) for rank in plan.micro_batches}) == 1
