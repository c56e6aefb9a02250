"""Megatron's DistributedOptimizer on gloo: 3 Adam steps at DP2 with the distributed optimizer = DP2 with the plain
optimizer = 1 rank (fp64, ≤ 1e-10: weights, grad norms, summed losses); its checkpoint (model and sharded optimizer
state through Megatron's dist checkpointing) saved at DP2 resumes at DP1 and the reverse, reproducing the next step;
a save killed midway leaves the previous checkpoint loadable."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.optimizer_cases import killed_during_save, train_steps
from tests.distributed.parallel_cases import make_samples, weights_rank
from vespo_megatron.megatron.parallel import spawn
from vespo_megatron.train import checkpoint

pytestmark = pytest.mark.slow

FAMILY, DTYPE, TOL = "qwen3_moe", torch.float64, 1e-10


@pytest.fixture(scope="module")
def setup():
    weights = spawn(weights_rank, 1, FAMILY, DTYPE)[0]
    batches = [make_samples(8, seed=s) for s in range(3)]
    reference = spawn(train_steps, 1, {}, FAMILY, DTYPE, weights, batches)[0]
    return weights, batches, reference


def _loss(results: list[dict], step: int) -> float:
    return sum(r["losses"][step] for r in results if r["report"])


def _assert_matches(results: list[dict], reference: dict, steps: range) -> None:
    for i, step in enumerate(steps):
        assert abs(_loss(results, i) - reference["losses"][step]) <= TOL
        assert abs(results[0]["norms"][i] - reference["norms"][step]) <= TOL
    assert sorted(results[0]["weights"]) == sorted(reference["weights"])
    for key, w in reference["weights"].items():
        assert torch.allclose(results[0]["weights"][key], w, atol=TOL, rtol=0), key


def test_reference_moves(setup):
    _, _, ref = setup
    assert len(set(ref["losses"])) == 3 and min(ref["norms"]) > 0
    assert ref["main_dtypes"] == {"torch.float64"}


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["plain", "distributed"])
def test_dp2_matches_one_rank(setup, distributed_optimizer):
    weights, batches, ref = setup
    results = spawn(train_steps, 2, {}, FAMILY, DTYPE, weights, batches, 2, distributed_optimizer)
    _assert_matches(results, ref, range(3))
    for r in results[1:]:  # the params are complete again on every rank after the all-gather
        for key, w in r["weights"].items():
            assert torch.equal(w, results[0]["weights"][key]), key


@pytest.mark.parametrize("save_dp, load_dp", [(2, 1), (1, 2)])
def test_checkpoint_resumes_at_another_data_parallel_size(setup, tmp_path, save_dp, load_dp):
    weights, batches, ref = setup
    root = str(tmp_path / "ckpt")
    spawn(train_steps, save_dp, {}, FAMILY, DTYPE, weights, batches[:2], 2, True, root)
    assert checkpoint.latest(root).name == "iter_0000002"
    assert sorted(p.name for p in checkpoint.latest(root).iterdir()) == \
        ["meta.json", "model", "optimizer"] + [f"rng_{r}.pt" for r in range(save_dp)]
    resumed = spawn(train_steps, load_dp, {}, FAMILY, DTYPE, weights, batches[2:], 2, True, None, root)
    _assert_matches(resumed, ref, range(2, 3))


def test_killed_save_leaves_the_previous_checkpoint(setup, tmp_path):
    weights, batches, _ = setup
    root = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="rank 0 was killed by signal SIGKILL"):
        spawn(killed_during_save, 1, FAMILY, weights, batches, str(root))
    assert checkpoint.latest(root).name == "iter_0000001"
    assert (root / "iter_0000002.partial").is_dir() and not (root / "iter_0000002").exists()
    after_one = spawn(train_steps, 1, {}, FAMILY, DTYPE, weights, batches[:1])[0]
    loaded = spawn(train_steps, 1, {}, FAMILY, DTYPE, weights, [], 2, False, None, str(root))[0]
    for key, w in after_one["weights"].items():
        assert torch.equal(loaded["weights"][key], w), key
