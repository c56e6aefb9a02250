"""bf16 through Megatron's mixed precision: bf16 params in Float16Module, fp32 logits out of the last stage (log-probs,
log-ratio sums and the VESPO kernel in fp32), fp32 main params and grads in Megatron's optimizer.

Bounds. bf16 keeps 8 significant bits: unit roundoff u = 2^-8 ≈ 3.9e-3. A loss or grad norm of the tiny model goes
through ~16 bf16 roundings in a row (2 layers × attention, MoE and norms, the logits) and VESPO exponentiates sums of
per-token log-ratios, so two bf16 runs that round in a different order (TP2+SP: split GEMMs and reduce-scatters; EP2:
experts on another rank, the distributed optimizer's sharded update) agree within 16u ≈ 6.3e-2 relative on the loss and
grad norm of each of 2 Adam steps. The bf16 run tracks the fp32 run within 0.1 relative over the same 2 steps (the
first step's update moves every weight by ~lr, so the second step's difference includes bf16's rounding of the
weights themselves)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.optimizer_cases import train_steps
from tests.distributed.parallel_cases import make_samples, weights_rank
from vespo_megatron.megatron.parallel import spawn

pytestmark = pytest.mark.slow

FAMILY, STEPS = "qwen3_moe", 2
LAYOUT_BOUND = 16 * 2.0 ** -8  # ≈ 6.3e-2 relative, see the module docstring
FP32_BOUND = 0.1


def _close(a: float, b: float, bound: float) -> bool:
    return abs(a - b) <= bound * max(1.0, abs(b))


@pytest.fixture(scope="module")
def setup():
    weights = spawn(weights_rank, 1, FAMILY, torch.float32)[0]
    batches = [make_samples(8, seed=s) for s in range(STEPS)]
    fp32 = spawn(train_steps, 1, {}, FAMILY, torch.float32, weights, batches)[0]
    bf16 = spawn(train_steps, 1, {}, FAMILY, torch.bfloat16, weights, batches)[0]
    return weights, batches, fp32, bf16


def test_bf16_tracks_fp32_with_fp32_main_params(setup):
    _, _, fp32, bf16 = setup
    assert bf16["param_dtypes"] == {"torch.bfloat16"} and bf16["main_dtypes"] == {"torch.float32"}
    assert fp32["param_dtypes"] == fp32["main_dtypes"] == {"torch.float32"}
    assert bf16["losses"] != fp32["losses"]  # really computed in bf16
    for step in range(STEPS):
        assert _close(bf16["losses"][step], fp32["losses"][step], FP32_BOUND), step
        assert _close(bf16["norms"][step], fp32["norms"][step], FP32_BOUND), step


@pytest.mark.parametrize("layout, distributed_optimizer", [({"tp": 2}, False), ({"ep": 2}, True)],
                         ids=["tp2-sp", "ep2-distributed-optimizer"])
def test_bf16_layout_matches_one_rank_bf16(setup, layout, distributed_optimizer):
    weights, batches, _, bf16 = setup
    results = spawn(train_steps, 2, layout, FAMILY, torch.bfloat16, weights, batches, 2, distributed_optimizer)
    assert results[0]["main_dtypes"] == {"torch.float32"}
    for step in range(STEPS):
        loss = sum(r["losses"][step] for r in results if r["report"])
        assert _close(loss, bf16["losses"][step], LAYOUT_BOUND), step
        assert _close(results[0]["norms"][step], bf16["norms"][step], LAYOUT_BOUND), step
