"""μ in synchronous training: the trainer's recomputed π_old (default) or the engine's log-probs
(--use-rollout-logprobs), and the train-inference mismatch the step reports (mismatch/logp_diff, logp_abs_diff).

One RL step with N = 1 mini-batch, so the update runs at the weights the rollouts came from: with μ = π_old every
sequence has logW = 0 exactly; with μ = the bf16 engine's log-probs, logW is the engine-trainer mismatch itself.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.train.config import TrainConfig
from vespo_megatron.cli import build_parser
from vespo_megatron.train.flags import config_from_args
from vespo_megatron.train.run import run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_hf_config("qwen3_moe", vocab_size=32)).save_pretrained(path)
    return str(path)


def _step(hf_dir: str, **kw) -> dict[str, float]:
    base = dict(hf_checkpoint=hf_dir, rollout_batch_size=4, n_samples_per_prompt=2, num_mini_batches=1,
                micro_batch_size=4, max_new_tokens=6, train_iters=1, engine_dtype="bf16", loss="vespo")
    history = run_training(TrainConfig(**{**base, **kw}), quiet=True)
    return history[0][1]


def test_recomputed_old_log_probs_give_log_w_zero_and_report_the_mismatch(hf_dir):
    bf16 = _step(hf_dir)
    assert bf16["vespo/log_w_seq_mean"] == 0.0 and bf16["vespo/log_w_seq_min"] == 0.0
    assert bf16["mismatch/logp_abs_diff"] > 1e-3  # a bf16 engine against an fp32 trainer
    assert abs(bf16["mismatch/logp_diff"]) <= bf16["mismatch/logp_abs_diff"]
    fp32 = _step(hf_dir, engine_dtype="fp32")
    assert fp32["mismatch/logp_abs_diff"] < bf16["mismatch/logp_abs_diff"] / 10


def test_rollout_log_probs_are_mu(hf_dir):
    recomputed = _step(hf_dir)
    rollout = _step(hf_dir, use_rollout_logprobs=True)
    assert not any(key.startswith("mismatch/") for key in rollout)  # no π_old pass, nothing to compare
    assert rollout["reward_mean"] == recomputed["reward_mean"]  # the same rollouts
    # π_θ here = the recomputed run's π_old, so logW_i = Σ_t (logπ_old − logμ) over sequence i's T_i tokens and
    # |mean_i logW_i| <= mean_i Σ_t |logπ_old − logμ| = mean_i T_i · (token mean of |logπ_old − logμ|)
    assert rollout["vespo/log_w_seq_mean"] != 0.0
    bound = recomputed["response_len_mean"] * recomputed["mismatch/logp_abs_diff"]
    assert abs(rollout["vespo/log_w_seq_mean"]) <= bound * (1 + 1e-6)


def test_flag_parses(hf_dir):
    def parse(*flags):
        return config_from_args(build_parser().parse_args(["train", "--hf-checkpoint", hf_dir, *flags]))

    assert parse("--use-rollout-logprobs").use_rollout_logprobs and not parse().use_rollout_logprobs
