"""`vespo-megatron train` takes Megatron-LM's flags with Megatron-LM's meanings: a typical Megatron-LM MoE launch line
(Qwen3-30B-A3B: TP 2 + SP, EP 8, TE with grouped GEMM, bf16, distributed optimizer, full recomputation, a constant
lr with warm-up) parses into the TrainConfig it says; what cannot run on this machine is a one-line error naming the
flag; the global batch (samples per optimizer step) and the rollout batch agree or fail; old spellings still work
with a deprecation warning; the recomputation flags reach Megatron's TransformerConfig."""
from __future__ import annotations

import importlib.util
import logging
import shlex

import pytest

from vespo_megatron.cli import build_parser
from vespo_megatron.errors import UsageError
from vespo_megatron.train.config import TrainConfig
from vespo_megatron.train.flags import config_from_args

# The parallelism / precision / optimizer / schedule / logging part of a Megatron-LM Qwen3-30B-A3B MoE script (the
# architecture flags of such scripts come from --hf-checkpoint here).
MEGATRON_LM_LINE = """
  --tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 1
  --expert-model-parallel-size 8 --expert-tensor-parallel-size 1 --context-parallel-size 1
  --transformer-impl transformer_engine --moe-grouped-gemm --moe-token-dispatcher-type alltoall
  --micro-batch-size 1 --global-batch-size 512
  --lr 1e-6 --min-lr 1e-7 --lr-decay-style cosine --lr-warmup-iters 10 --lr-decay-iters 2000
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.98 --clip-grad 1.0
  --bf16 --use-distributed-optimizer
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
  --train-iters 100 --save /ckpt/run --load /ckpt/run --save-interval 20
  --tensorboard-dir /logs/run --log-interval 5 --wandb-project qwen3-moe --seed 42
"""
RL = "--hf-checkpoint /ckpt/hf --rollout-batch-size 256 --n-samples-per-prompt 8"


def parse(line: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *shlex.split(line)]))


@pytest.fixture
def te_installed(monkeypatch):
    """Transformer Engine and DeepEP taken as importable (as on the H100 cluster)."""
    monkeypatch.setattr("vespo_megatron.train.config._importable", lambda module: True)


def test_megatron_lm_moe_launch_line(te_installed):
    cfg = parse(f"{RL} {MEGATRON_LM_LINE}")
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.expert_model_parallel_size,
            cfg.expert_tensor_parallel_size, cfg.context_parallel_size) == (2, 1, 8, 1, 1)
    assert cfg.sequence_parallel and cfg.moe_grouped_gemm and cfg.bf16 and cfg.use_distributed_optimizer
    assert (cfg.transformer_impl, cfg.moe_token_dispatcher_type) == ("transformer_engine", "alltoall")
    # Megatron-LM's batch meanings: 512 samples per optimizer step of a 256 x 8 = 2048-sample rollout -> N = 4
    assert (cfg.micro_batch_size, cfg.global_batch_size, cfg.num_mini_batches) == (1, 512, 4)
    assert (cfg.lr, cfg.min_lr, cfg.lr_decay_style, cfg.lr_warmup_iters, cfg.lr_decay_iters) == (
        1e-6, 1e-7, "cosine", 10, 2000)
    assert (cfg.weight_decay, cfg.adam_beta1, cfg.adam_beta2, cfg.clip_grad) == (0.1, 0.9, 0.98, 1.0)
    assert (cfg.train_iters, cfg.save, cfg.load, cfg.save_interval) == (100, "/ckpt/run", "/ckpt/run", 20)
    assert (cfg.tensorboard_dir, cfg.log_interval, cfg.wandb_project, cfg.seed) == ("/logs/run", 5, "qwen3-moe", 42)
    assert cfg.total_optimizer_steps == 400
    assert cfg.model_options() == dict(use_te=True, dispatcher="alltoall", moe_grouped_gemm=True,
                                       recompute_granularity="full", recompute_method="uniform",
                                       recompute_num_layers=1)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="TE is installed here")
def test_te_flags_fail_clearly_without_te():
    with pytest.raises(UsageError, match=r"^--transformer-impl: transformer_engine needs NVIDIA Transformer Engine"):
        parse(f"{RL} {MEGATRON_LM_LINE}")
    with pytest.raises(UsageError, match=r"^--moe-grouped-gemm: needs --transformer-impl transformer_engine"):
        parse(f"{RL} --moe-grouped-gemm")


@pytest.mark.skipif(importlib.util.find_spec("deep_ep") is not None, reason="DeepEP is installed here")
def test_flex_dispatcher_needs_deepep():
    with pytest.raises(UsageError, match=r"^--moe-token-dispatcher-type: flex needs DeepEP"):
        parse(f"{RL} --moe-token-dispatcher-type flex")


def test_allgather_dispatcher_is_refused():
    """Megatron-Core's allgather dispatcher refuses variable sequence lengths (packed batches): said at the flag."""
    with pytest.raises(UsageError, match=r"^--moe-token-dispatcher-type: allgather does not take variable sequence"):
        parse(f"{RL} --moe-token-dispatcher-type allgather")


@pytest.mark.parametrize("line, n, gbs", [
    ("--rollout-batch-size 8 --n-samples-per-prompt 4", 4, 8),  # neither given: N = 4
    ("--rollout-batch-size 8 --n-samples-per-prompt 4 --global-batch-size 16", 2, 16),
    ("--rollout-batch-size 8 --n-samples-per-prompt 4 --num-mini-batches 8", 8, 4),
    ("--rollout-batch-size 8 --n-samples-per-prompt 4 --num-mini-batches 1 --global-batch-size 32", 1, 32),
])
def test_global_batch_and_mini_batches(line, n, gbs):
    cfg = parse(f"--hf-checkpoint x {line}")
    assert (cfg.num_mini_batches, cfg.samples_per_optimizer_step) == (n, gbs)
    assert cfg.num_mini_batches * cfg.samples_per_optimizer_step == cfg.rollout_samples == 32


@pytest.mark.parametrize("line, error", [
    ("--global-batch-size 5", r"^--global-batch-size: 5 does not divide the rollout batch 32 \(= --rollout-batch-size "
                              r"8 × --n-samples-per-prompt 4\)$"),
    ("--num-mini-batches 3", "^--num-mini-batches: 3 does not divide the rollout batch 32"),
    ("--global-batch-size 8 --num-mini-batches 2", "^--global-batch-size: 8 samples per optimizer step × "
                                                   "--num-mini-batches 2 must equal the rollout batch 32"),
    ("--global-batch-size 0", "^--global-batch-size: must be >= 1"),
    ("--use-dynamic-batch-size", "^--max-tokens-per-gpu: required"),
    ("--max-tokens-per-gpu 64", "^--max-tokens-per-gpu: applies with --use-dynamic-batch-size"),
    ("--use-dynamic-batch-size --max-tokens-per-gpu 20 --max-prompt-len 15 --max-new-tokens 6",
     "^--max-tokens-per-gpu: 20 < the longest sample .* = 22$"),
    ("--recompute-granularity full", "^--recompute-method: required with --recompute-granularity full"),
    ("--recompute-granularity full --recompute-method block", "^--recompute-num-layers: required"),
    ("--recompute-granularity selective --recompute-method uniform", "^--recompute-method: applies with "
                                                                     "--recompute-granularity full only"),
    ("--recompute-num-layers 2", "^--recompute-num-layers: applies with --recompute-granularity full only"),
    ("--lr-warmup-iters 40 --train-iters 10", r"^--lr-warmup-iters: must be in \[0, 40\)"),
    ("--min-lr 1 --lr 0.1", r"^--min-lr: must be in \[0, --lr 0.1\]"),
    ("--lr-decay-iters 0", "^--lr-decay-iters: must be >= 1"),
    ("--expert-tensor-parallel-size 0", "^--expert-tensor-parallel-size: must be >= 1"),
])
def test_inconsistent_flags_fail_with_one_line(line, error):
    with pytest.raises(UsageError, match=error):
        parse(f"--hf-checkpoint x --rollout-batch-size 8 --n-samples-per-prompt 4 {line}")


def test_tensor_parallel_runs_sequence_parallel():
    assert parse("--hf-checkpoint x --tensor-model-parallel-size 2 --sequence-parallel").sequence_parallel
    with pytest.raises(UsageError, match="^--sequence-parallel: tensor parallelism runs with sequence parallelism"):
        TrainConfig(hf_checkpoint="x", tensor_model_parallel_size=2, sequence_parallel=False).check_flags()


def test_old_spellings_still_work_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = parse("--hf-checkpoint x --rollout-batch-size 8 --n-samples-per-prompt 4 --global-batch-size 16 "
                    "--lr-warmup-steps 3 --log-dir /tmp/logs")
    # 3 RL steps of warm-up = 3 x N optimizer steps (N = 32 / 16 = 2)
    assert (cfg.lr_warmup_iters, cfg.tensorboard_dir) == (6, "/tmp/logs")
    text = caplog.text
    assert "--lr-warmup-steps is deprecated: use --lr-warmup-iters" in text
    assert "--log-dir is deprecated: use --tensorboard-dir" in text
    with pytest.raises(UsageError, match="^--lr-warmup-steps: give --lr-warmup-iters only"):
        parse("--hf-checkpoint x --lr-warmup-steps 1 --lr-warmup-iters 2")


def test_recompute_reaches_the_transformer_config():
    """The flags' model options build Megatron's TransformerConfig with Megatron-LM's recompute fields."""
    from vespo_megatron.hf_config import tiny_hf_config
    from vespo_megatron.megatron.model import transformer_config
    from vespo_megatron.megatron.parallel import init_parallel

    init_parallel()
    options = parse("--hf-checkpoint x --recompute-granularity full --recompute-method block "
                    "--recompute-num-layers 1").model_options()
    use_te = options.pop("use_te")
    dispatcher = options.pop("dispatcher")
    config = transformer_config(tiny_hf_config("qwen3_moe"), dispatcher=dispatcher, **options)
    assert not use_te
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "block", 1)
    assert (config.moe_token_dispatcher_type, config.moe_grouped_gemm) == ("alltoall", False)


def test_use_rollout_logprobs_flag():
    assert parse(f"{RL} --use-rollout-logprobs").use_rollout_logprobs and not parse(RL).use_rollout_logprobs
