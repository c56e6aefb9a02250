"""The RL loop end to end on the CPU engine: resume reproduces the next step exactly; bad inputs fail at start; μ is
the recomputed π_old or, with --use-rollout-logprobs, the engine's log-probs, and a step reports the mismatch."""
from __future__ import annotations

import dataclasses

import numpy as np

import pytest
import torch
from transformers import AutoModelForCausalLM

from vespo_megatron.errors import UsageError
from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.train.config import TrainConfig
from vespo_megatron.train.run import preflight, run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _hf_dir(path, **overrides):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_hf_config("qwen3_moe", **{"vocab_size": 32, **overrides})).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory.mktemp("hf"))


def _cfg(hf_dir: str, **kw) -> TrainConfig:
    base = dict(hf_checkpoint=hf_dir, rollout_batch_size=4, n_samples_per_prompt=2, num_mini_batches=2,
                micro_batch_size=2, max_new_tokens=4, train_iters=3, engine_dtype="fp32", routing_replay="r3")
    return TrainConfig(**{**base, **kw})


def test_resume_reproduces_the_next_step(hf_dir, tmp_path):
    full = run_training(_cfg(hf_dir), quiet=True)
    first = run_training(_cfg(hf_dir, train_iters=2, save=str(tmp_path / "ckpt")), quiet=True)
    resumed = run_training(_cfg(hf_dir, load=str(tmp_path / "ckpt")), quiet=True)
    assert [it for it, _ in full] == [0, 1, 2] and [it for it, _ in resumed] == [2]
    assert first[1][1]["loss"] == full[1][1]["loss"]
    for key in ("loss", "reward_mean", "grad_norm", "vespo/w_seq_mean"):
        assert resumed[0][1][key] == full[2][1][key], key
    assert full[2][1]["loss"] != full[1][1]["loss"]
    assert full[2][1]["routing_replay/rows_replayed"] > 0 and full[2][1]["routing_replay/rows_fallback"] == 0


@pytest.mark.parametrize("change, message", [
    (dict(loss="ppo2"), "--loss: unknown policy loss 'ppo2'"),
    (dict(routing_replay="r4"), "--routing-replay: unknown mode 'r4'"),
    (dict(num_mini_batches=3), "--num-mini-batches: 3 does not divide the rollout batch 8"),
    (dict(global_batch_size=3, num_mini_batches=None), "--global-batch-size: 3 does not divide the rollout batch 8"),
    (dict(use_dynamic_batch_size=True), "--max-tokens-per-gpu: required"),
    (dict(async_rollout=True, max_lag=0), "--max-lag: must be >= 1"),
    (dict(hf_checkpoint=""), "--hf-checkpoint: required"),
])
def test_bad_config_fails_before_work(hf_dir, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        preflight(dataclasses.replace(_cfg(hf_dir), **change))


def test_checkpoint_of_another_model_fails_at_start(hf_dir, tmp_path):
    run_training(_cfg(hf_dir, train_iters=1, save=str(tmp_path / "ckpt")), quiet=True)
    other = _hf_dir(tmp_path / "other", num_hidden_layers=2)
    with pytest.raises(ValueError, match="checkpoint of another model"):
        preflight(_cfg(other, load=str(tmp_path / "ckpt")))


def test_unreachable_engine_fails_at_start(hf_dir):
    from vespo_megatron.megatron.parallel import free_port

    with pytest.raises(UsageError, match="--sglang-url: .* the rollout engine is unreachable"):
        preflight(_cfg(hf_dir, sglang_url=f"http://127.0.0.1:{free_port()}"))


def test_async_training_runs_with_bounded_lag(hf_dir):
    history = run_training(_cfg(hf_dir, async_rollout=True, max_lag=1, routing_replay="off"), quiet=True)
    assert [it for it, _ in history] == [0, 1, 2]
    lags = [m["policy_lag"] for _, m in history]
    assert all(0 <= lag <= 1 for lag in lags)
    assert all(np.isfinite(m["loss"]) for _, m in history)


def test_dynamic_batching_trains_as_fixed_micro_batches(tmp_path):
    """The trainer's --use-dynamic-batch-size path on 2 data-parallel ranks: the first step's loss and gradient norm
    equal those of fixed micro-batches (same rollouts; fp32, ≤ 1e-5 relative: only the summation order differs).
    12 tokens and temperature 2: rewards differ inside groups, so the gradient is not zero."""
    hf = _hf_dir(tmp_path / "hf12", vocab_size=12)
    base = dict(rollout_batch_size=8, n_samples_per_prompt=4, num_mini_batches=1, max_new_tokens=5, train_iters=1,
                temperature=2.0)
    fixed = run_training(_cfg(hf, **base, micro_batch_size=1), world_size=2, quiet=True)
    dynamic = run_training(_cfg(hf, **base, use_dynamic_batch_size=True, max_tokens_per_gpu=40), world_size=2,
                           quiet=True)
    (_, a), (_, b) = fixed[0], dynamic[0]
    assert a["reward_mean"] == b["reward_mean"]
    for key in ("loss", "grad_norm", "entropy"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert a["grad_norm"] > 1e-3


def _step(hf_dir: str, **kw) -> dict[str, float]:
    """One VESPO step with N = 1 mini-batch against the bf16 engine: the update runs at the weights the rollouts came
    from, so with μ = the recomputed π_old every logW is exactly 0, and with μ = the engine's log-probs (
    --use-rollout-logprobs) logW is the engine-trainer mismatch itself."""
    step = dict(num_mini_batches=1, micro_batch_size=4, max_new_tokens=6, train_iters=1, engine_dtype="bf16",
                routing_replay="off", loss="vespo")
    return run_training(_cfg(hf_dir, **{**step, **kw}), quiet=True)[0][1]


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
