"""`vespo-megatron train --context-parallel-size 2` on 2 CPU ranks: the first step equals the DP2 run of the same seed.

Both runs start the CPU engine behind the SGLang protocol with the same weights and seed, so they draw the same
rollouts; DP2 splits the micro-batches over 2 data-parallel ranks, CP2 gives every sequence's zig-zag chunks (tokens,
rollout log-probs, R3 routing trace) to 2 context-parallel ranks. With one mini-batch the step's loss and gradient
norm come from the initial weights in both, and must agree to fp32 round-off (1e-5).
"""
from __future__ import annotations

import argparse

import pytest
import torch
from transformers import AutoModelForCausalLM

from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.train.config import TrainConfig
from vespo_megatron.train.flags import add_train_args, config_from_args
from vespo_megatron.train.run import default_world_size, run_training

pytestmark = pytest.mark.slow
TOL = 1e-5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_hf_config("qwen3_moe", vocab_size=12)).save_pretrained(path)
    return str(path)


def _cfg(hf_dir: str, **kw) -> TrainConfig:
    # 12 tokens, temperature 2: the random model's responses earn rewards that differ inside groups (advantages ≠ 0)
    base = dict(hf_checkpoint=hf_dir, rollout_batch_size=8, n_samples_per_prompt=4, num_mini_batches=1,
                micro_batch_size=4, max_new_tokens=5, train_iters=1, engine_dtype="fp32", routing_replay="r3",
                temperature=2.0)
    return TrainConfig(**{**base, **kw})


def test_flag_sets_the_context_parallel_world():
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    cfg = config_from_args(parser.parse_args(["--hf-checkpoint", "x", "--context-parallel-size", "2",
                                              "--tensor-model-parallel-size", "2"]))
    assert cfg.context_parallel_size == 2 and default_world_size(cfg) == 4
    with pytest.raises(ValueError, match="--context-parallel-size: must be >= 1"):
        config_from_args(parser.parse_args(["--hf-checkpoint", "x", "--context-parallel-size", "0"]))


def test_cp2_first_step_matches_dp2(hf_dir):
    dp2 = run_training(_cfg(hf_dir), world_size=2, quiet=True)
    cp2 = run_training(_cfg(hf_dir, context_parallel_size=2), world_size=2, quiet=True)
    (it_dp, dp), (it_cp, cp) = dp2[0], cp2[0]
    assert it_dp == it_cp == 0
    assert dp["reward_mean"] == cp["reward_mean"] and dp["response_len_mean"] == cp["response_len_mean"]
    for key in ("loss", "grad_norm", "entropy", "vespo/log_w_seq_mean", "objective/n_active_seq"):
        assert cp[key] == pytest.approx(dp[key], rel=TOL, abs=1e-7), key
    assert dp["grad_norm"] > 1e-3  # the loss itself is ~0 at the first step (W = 1, group-normalised advantages)
    assert cp["routing_replay/rows_replayed"] == dp["routing_replay/rows_replayed"] > 0
    assert cp["routing_replay/rows_fallback"] == 0
