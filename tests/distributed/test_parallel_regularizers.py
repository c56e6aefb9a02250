"""The KL and entropy terms keep every parallel layout exact: TP2 (+SP), DP2, CP2 and PP2 give the 1-rank run's loss,
kl_loss / entropy_loss, per-token log-probs and gradients (fp64, ≤ 1e-10), with kl_coef and entropy_coef non-zero.

The reference model (``train.reference.Reference``, same layout as the policy) holds the policy's weights perturbed
by fixed noise, so kl_t ≠ 0 on every token; the entropy term's gradient goes through the vocabulary-parallel
entropy backward.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.parallel_cases import make_samples, run_layout, weights_rank
from tests.distributed.test_parallel_exactness import FAMILY, TOL, _assert_same, _combine
from vespo_megatron.megatron.parallel import spawn

pytestmark = pytest.mark.slow

DTYPE = torch.float64
SETTINGS = dict(kl_coef=0.1, kl_loss_type="low_var_kl", entropy_coef=0.01)


def _perturbed(weights: dict) -> dict:
    gen = torch.Generator().manual_seed(11)
    return {key: value + 0.05 * torch.randn(value.shape, generator=gen, dtype=value.dtype)
            for key, value in weights.items()}


@pytest.fixture(scope="module")
def setup():
    weights = spawn(weights_rank, 1, FAMILY, DTYPE)[0]
    ref_weights = _perturbed(weights)
    samples = make_samples(8)
    args = (FAMILY, DTYPE, weights, samples, (2,))
    one = spawn(run_layout, 1, {}, *args, "vespo", ref_weights, SETTINGS)[0][0]
    plain = spawn(run_layout, 1, {}, *args)[0][0]
    return args, ref_weights, one, plain


def _check(results: list[dict], one: dict) -> None:
    _assert_same(_combine(results), one)
    reporting = [r for r in results if r["report"]]
    for key in ("kl_loss", "entropy_loss"):
        got = sum(r[key] for r in reporting)
        assert abs(got - one[key]) <= TOL * max(1.0, abs(one[key])), (key, got, one[key])


def test_the_terms_change_loss_and_gradients(setup):
    _, _, one, plain = setup
    assert one["kl_loss"] > 1e-4 and one["entropy_loss"] > 1.0
    expected = plain["loss"] + SETTINGS["kl_coef"] * one["kl_loss"] - SETTINGS["entropy_coef"] * one["entropy_loss"]
    assert abs(one["loss"] - expected) <= 1e-12 * max(1.0, abs(expected))
    diff = max(float((one["grads"][k] - plain["grads"][k]).abs().max()) for k in plain["grads"])
    assert diff > 1e-6


@pytest.mark.parametrize("layout, world", [(dict(tp=2), 2), (dict(), 2), (dict(cp=2), 2), (dict(pp=2), 2)],
                         ids=["tp2-sp", "dp2", "cp2", "pp2"])
def test_layout_matches_one_rank(setup, layout, world):
    args, ref_weights, one, _ = setup
    results = spawn(run_layout, world, layout, *args, "vespo", ref_weights, SETTINGS)
    _check([r[0] for r in results], one)
