"""Every parallel layout gives the 1-rank run's loss, per-token log-probs and gradients (fp64, ≤ 1e-10).

One gloo world per layout; the same global weights (from a 1-rank build) are loaded into every layout, and the same
8 samples are split into micro-batches (round-robin over data-parallel ranks). Loss: VESPO with μ = the samples'
rollout log-probs (so W ≠ 1 and φ varies), exact global token-mean.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.parallel_cases import make_samples, run_layout, weights_rank
from vespo_megatron.megatron.parallel import spawn

FAMILY, DTYPE, TOL = "qwen3_moe", torch.float64, 1e-10


@pytest.fixture(scope="module")
def setup():
    weights = spawn(weights_rank, 1, FAMILY, DTYPE)[0]
    samples = make_samples(8)
    reference = spawn(run_layout, 1, {}, FAMILY, DTYPE, weights, samples, (1, 2, 4))[0]
    return weights, samples, reference


def _combine(results: list[dict]) -> tuple[float, dict, dict]:
    reporting = [r for r in results if r["report"]]
    logp = {sid: lp for r in reporting for sid, lp in r["logp"].items()}
    return sum(r["loss"] for r in reporting), logp, results[0]["grads"]


def _assert_same(got: tuple[float, dict, dict], ref: dict) -> None:
    loss, logp, grads = got
    assert abs(loss - ref["loss"]) <= TOL * max(1.0, abs(ref["loss"]))
    assert sorted(logp) == sorted(ref["logp"]) == list(range(8))
    for sid, lp in ref["logp"].items():
        assert torch.allclose(logp[sid], lp, atol=TOL, rtol=0), sid
    assert sorted(grads) == sorted(ref["grads"])
    for key, g in ref["grads"].items():
        assert torch.allclose(grads[key], g, atol=TOL, rtol=0), key


def test_reference_is_not_trivial(setup):
    _, _, reference = setup
    ref = reference[0]
    assert ref["loss"] != 0.0
    router = [k for k in ref["grads"] if k.endswith("router.weight")]
    assert router and all(ref["grads"][k].abs().max() > 1e-6 for k in router)
    assert all(v.abs().max() > 0 for k, v in ref["grads"].items() if "experts" in k)


@pytest.mark.parametrize("n_micro", [2, 4])
def test_micro_batch_splits(setup, n_micro):
    _, _, reference = setup
    got = reference[{2: 1, 4: 2}[n_micro]]
    _assert_same((got["loss"], got["logp"], got["grads"]), reference[0])


@pytest.mark.parametrize(
    "layout",
    [dict(tp=2), dict(ep=2), dict(pp=2), dict(), dict(tp=2, ep=2, etp=1)],
    ids=["tp2-sp", "ep2", "pp2", "dp2", "tp2-ep2"],
)
def test_layout_matches_one_rank(setup, layout):
    weights, samples, reference = setup
    results = spawn(run_layout, 2, layout, FAMILY, DTYPE, weights, samples, (2,))
    _assert_same(_combine([r[0] for r in results]), reference[0])
