"""The `vespo-megatron train` flags: one per TrainConfig field, Megatron-LM's names and meanings
(``--tensor-model-parallel-size``, ``--global-batch-size``, ``--lr-warmup-iters``, ``--tensorboard-dir`` …).

Booleans are ``store_true``; choices are listed in ``--help``. Old spellings keep working with a deprecation warning
(:data:`DEPRECATED`): ``--lr-warmup-steps W`` counted RL steps and becomes ``--lr-warmup-iters W × N``; ``--log-dir D``
becomes ``--tensorboard-dir D``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging

from vespo_megatron.errors import UsageError
from vespo_megatron.objectives.config import KL_LOSS_TYPES
from vespo_megatron.train.config import (DISPATCHERS, ESTIMATORS, LOSSES, LR_DECAY_STYLES, RECOMPUTE_GRANULARITY,
                                         RECOMPUTE_METHODS, REPLAY, TRANSFORMER_IMPLS, WEIGHT_SYNC, TrainConfig, _flag)

logger = logging.getLogger(__name__)

HELP: dict[str, str] = {
    "hf_checkpoint": "HF directory (save_pretrained output): the model, its config and the engine's weights",
    "sglang_url": "running SGLang server; repeat for several engines (requests spread, weights pushed to all), or an "
                  "sglang-router URL; default: start the CPU engine (SGLang protocol) in this process",
    "engine_dtype": "dtype of the in-process CPU engine",
    "weight_sync": "how weights reach the engines after each step: distributed (broadcast over a process group the "
                   "engines join: NCCL on GPU, gloo on CPU), disk (sharded safetensors), tensor (CUDA IPC, same node) "
                   "or auto (distributed when every engine serves it, else disk)",
    "weight_sync_bucket_mb": "most MiB per broadcast bucket of the distributed weight sync (rank-0 host memory: one "
                             "bucket + one tensor)",
    "weight_sync_master_addr": "address of training rank 0 the engines reach for the distributed weight sync "
                               "(default: 127.0.0.1 when every engine is local, else this host's address)",
    "tensor_model_parallel_size": "tensor-parallel size (sequence parallel is on when > 1)",
    "expert_tensor_parallel_size": "tensor-parallel size of the experts (Megatron-LM's default is the TP size; here 1 "
                                   "unless given)",
    "sequence_parallel": "sequence parallelism over the TP ranks (always on when TP > 1 in this trainer: the flag "
                         "states it, as Megatron-LM MoE scripts do)",
    "transformer_impl": "layer implementation: local (Megatron-Core's local spec, runs anywhere) or transformer_engine "
                        "(TE's fused kernels and context-parallel attention; CUDA). Megatron-LM's default is "
                        "transformer_engine: give it on GPUs",
    "moe_grouped_gemm": "experts as one grouped GEMM (TE's grouped linear; needs --transformer-impl transformer_engine)",
    "moe_token_dispatcher_type": "MoE token dispatcher: allgather, alltoall or flex (DeepEP, CUDA)",
    "recompute_granularity": "activation recomputation: full (whole layers) or selective (core attention)",
    "recompute_method": "with full recomputation: uniform (every --recompute-num-layers layers as a chunk) or block "
                        "(the first --recompute-num-layers layers of each pipeline stage)",
    "recompute_num_layers": "layers per recomputed chunk (uniform) or recomputed layers per stage (block)",
    "pipeline_model_parallel_size": "pipeline-parallel size",
    "expert_model_parallel_size": "expert-parallel size",
    "context_parallel_size": "context-parallel size: each sequence is padded to a multiple of 2·cp and its zig-zag "
                             "chunks spread over the CP ranks",
    "loss": "policy loss",
    "loss_agg_mode": "loss aggregation",
    "honour_agg_mode": "gspo/sapo use --loss-agg-mode instead of the official seq-mean-token-mean",
    "official_aggregation": "normalise per micro-batch as the official code (default: exact global token-mean)",
    "routing_replay": "MoE routing replay: off, r2 (record π_old's experts) or r3 (the rollout engine's experts)",
    "rollout_batch_size": "prompts per step",
    "n_samples_per_prompt": "responses per prompt (a GRPO group)",
    "global_batch_size": "samples per optimizer step (Megatron-LM's meaning); N = rollout batch × samples per prompt "
                         "/ this (default: from --num-mini-batches)",
    "num_mini_batches": "N = optimizer steps per RL step (staleness N); default: from --global-batch-size, else 4",
    "micro_batch_size": "samples per micro-batch per data-parallel rank",
    "use_dynamic_batch_size": "cut micro-batches by a token budget (--max-tokens-per-gpu) instead of "
                              "--micro-batch-size; every data-parallel rank runs the same number of micro-batches",
    "max_tokens_per_gpu": "token budget of one micro-batch on one rank (padded tokens, before the CP split)",
    "max_new_tokens": "response length limit in tokens (alias --max-new-tokens)",
    "temperature": "sampling temperature; training log-probs are those of logits / temperature (alias --temperature)",
    "rollout_top_p": "nucleus sampling: keep the most likely tokens up to this probability mass",
    "rollout_top_k": "sample among the k most likely tokens (-1: all)",
    "rollout_stop": "stop string (repeatable; needs a server that detokenises, e.g. SGLang)",
    "rollout_stop_token_ids": "extra stop token ids, besides the model's EOS (generation_config.json, tokenizer)",
    "lr": "learning rate",
    "min_lr": "learning rate at the end of the decay",
    "lr_decay_style": "learning-rate decay (Megatron-Core's OptimizerParamScheduler): constant, linear, cosine or "
                      "inverse-square-root (Megatron-LM's default is linear; RL recipes use constant)",
    "lr_warmup_iters": "linear warm-up from 0, in optimizer steps (N per RL step)",
    "lr_decay_iters": "decay length in optimizer steps (default: --train-iters × N)",
    "weight_decay": "Adam weight decay",
    "adam_beta1": "Adam beta1",
    "adam_beta2": "Adam beta2",
    "clip_grad": "gradient-norm clipping",
    "bf16": "bf16 mixed precision (Megatron's Float16Module; fp32 main params and grads in the optimizer; log-probs "
            "and the loss in fp32)",
    "use_distributed_optimizer": "Megatron's DistributedOptimizer: optimizer state sharded over the data-parallel "
                                 "ranks",
    "kl_coef": "coefficient of the KL(π‖π_ref) loss term against the frozen reference (--ref-load; default: the "
               "initial weights)",
    "kl_loss_type": f"KL estimator of the loss term: {', '.join(KL_LOSS_TYPES)} (k2 = mse, k3 = low_var_kl)",
    "entropy_coef": "coefficient of the entropy bonus (loss − entropy_coef · H)",
    "ref_load": "reference policy π_ref for --kl-coef: a Megatron checkpoint directory or a --save directory (its "
                "latest iteration); default: the initial weights",
    "train_iters": "RL steps to run (each takes N optimizer steps)",
    "seed": "random seed",
    "async_rollout": "fully asynchronous rollouts (μ = the engine's log-probs)",
    "use_rollout_logprobs": "use the engine's log-probs as the behaviour policy μ (π_old) instead of recomputing "
                            "them (always so with --async-rollout); VESPO's W = π/μ then also corrects the "
                            "train-inference mismatch",
    "max_lag": "largest policy lag of an asynchronous rollout",
    "save": "checkpoint directory to save to",
    "load": "checkpoint directory to resume from",
    "save_interval": "save every N steps (0: only at the end)",
    "tensorboard_dir": "TensorBoard event files and metrics.jsonl (every step)",
    "log_interval": "log the progress line every this many steps",
    "wandb_project": "Weights & Biases project (off when unset)",
    "task_symbols": "symbols of the synthetic repeat task (used without --prompt-data)",
    "prompt_data": "prompt file: .jsonl, .parquet or a datasets save_to_disk directory (default: the synthetic task)",
    "input_key": "column of the prompt: text or chat messages [{role, content}]",
    "label_key": "column of the label handed to the reward (dotted path into nested columns allowed)",
    "metadata_key": "column of per-row metadata (a dict or a JSON string) handed to the reward",
    "apply_chat_template": "render prompts with the tokenizer's chat template (with the generation prompt)",
    "tokenizer": "tokenizer directory (default: --hf-checkpoint)",
    "rollout_shuffle": "shuffle the prompts, anew each epoch",
    "max_prompt_len": "drop (and count) prompts longer than this many tokens",
    "prompt_data_bad_rows": "a bad row (missing key, empty prompt, undecodable): error, or skip and count",
    "reward": "registered reward: math, dapo, exact, repeat (default: repeat without --prompt-data)",
    "custom_reward_path": "user reward module:function or file.py:function (one sample -> float or {score})",
    "reward_errors": "a reward that raises: raise, or zero (counted in reward/errors)",
    "advantage_estimator": "grpo, dr-grpo (no std normalisation), rloo or reinforce++-baseline",
    "dynamic_sampling": "DAPO dynamic sampling: drop groups whose rewards are all equal and draw more prompts",
    "dynamic_sampling_max_rounds": "generation rounds per step at most with --dynamic-sampling",
    "eval_prompt_data": "NAME PATH of an eval set, read with the --input-key/--label-key/... of training (repeatable)",
    "eval_interval": "evaluate every N steps (0: never)",
    "n_samples_per_eval_prompt": "responses per eval prompt (pass@n is logged when > 1)",
    "eval_greedy": "greedy decoding for evaluation (default: the rollout sampling settings)",
}
ALIASES = {"max_new_tokens": ("--rollout-max-response-len", "--max-new-tokens"),
           "temperature": ("--rollout-temperature", "--temperature")}
ALIASES = {"max_new_tokens": ("--rollout-max-response-len", "--max-new-tokens"),
           "temperature": ("--rollout-temperature", "--temperature")}
CHOICES = {"advantage_estimator": ESTIMATORS, "loss": LOSSES, "routing_replay": REPLAY, "weight_sync": WEIGHT_SYNC,
           "lr_decay_style": LR_DECAY_STYLES, "transformer_impl": TRANSFORMER_IMPLS,
           "moe_token_dispatcher_type": DISPATCHERS, "recompute_granularity": RECOMPUTE_GRANULARITY,
           "recompute_method": RECOMPUTE_METHODS}
OPTIONAL_INT = ("max_prompt_len", "global_batch_size", "num_mini_batches", "max_tokens_per_gpu", "lr_decay_iters",
                "recompute_num_layers")
# old flag -> (its destination in the namespace, the new flag)
DEPRECATED = {"--lr-warmup-steps": ("deprecated_lr_warmup_steps", "--lr-warmup-iters"),
              "--log-dir": ("deprecated_log_dir", "--tensorboard-dir")}


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; the deprecated spellings; ``--loss-hparam``."""
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "hparams":
            continue
        flag, default, text = _flag(f.name), getattr(defaults, f.name), HELP[f.name]
        if f.name in ("global_batch_size", "num_mini_batches"):
            default = None  # resolved from each other by TrainConfig
        if f.name in ALIASES:
            parser.add_argument(*ALIASES[f.name], dest=f.name, type=type(default), default=default, help=text)
        elif f.name == "sequence_parallel" or isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default, help=text)
        elif f.name == "eval_prompt_data":
            parser.add_argument(flag, nargs=2, action="append", default=[], metavar=("NAME", "PATH"), help=text)
        elif f.name in ("rollout_stop", "rollout_stop_token_ids"):
            parser.add_argument(flag, action="append", default=[], help=text,
                                type=int if f.name.endswith("ids") else str)
        elif f.name in OPTIONAL_INT:
            parser.add_argument(flag, type=int, default=default, help=text)
        elif f.name in CHOICES:
            parser.add_argument(flag, default=default, choices=CHOICES[f.name], help=text)
        elif f.name == "sglang_url":
            parser.add_argument(flag, action="append", default=None, metavar="URL", help=text)
        elif f.name == "hf_checkpoint":
            parser.add_argument(flag, required=True, metavar="DIR", help=text)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--lr-warmup-steps", dest=DEPRECATED["--lr-warmup-steps"][0], type=int, default=None,
                        metavar="STEPS",
                        help="deprecated: RL steps of warm-up; use --lr-warmup-iters (optimizer steps)")
    parser.add_argument("--log-dir", dest=DEPRECATED["--log-dir"][0], default=None, metavar="DIR",
                        help="deprecated: use --tensorboard-dir")
    parser.add_argument("--loss-hparam", action="append", default=[], metavar="KEY=VALUE",
                        help="policy-loss hyper-parameter, e.g. k_pos=2.0 or clip_ratio_high=0.28 (repeatable)")


def _hparams(items: list[str]) -> dict[str, float]:
    hparams = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            hparams[key] = float(value)
        except ValueError:
            raise UsageError("--loss-hparam", f"expected KEY=NUMBER, got {item!r}") from None
    return hparams


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed flags (deprecated spellings translated, with a warning); the cheap checks run."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    log_dir = getattr(args, DEPRECATED["--log-dir"][0], None)
    if log_dir is not None:
        logger.warning("--log-dir is deprecated: use --tensorboard-dir (Megatron-LM's name)")
        if values.get("tensorboard_dir") not in (None, log_dir):
            raise UsageError("--log-dir", "give --tensorboard-dir only (both given, different)")
        values["tensorboard_dir"] = log_dir
    cfg = TrainConfig(**values, hparams=_hparams(getattr(args, "loss_hparam", [])))
    warmup_steps = getattr(args, DEPRECATED["--lr-warmup-steps"][0], None)
    if warmup_steps is not None:
        if cfg.num_mini_batches is None:
            cfg.check_flags()  # the batch-size error, before the translation needs N
        logger.warning("--lr-warmup-steps is deprecated: use --lr-warmup-iters (optimizer steps; %d RL steps = %d)",
                       warmup_steps, warmup_steps * cfg.num_mini_batches)
        if args.lr_warmup_iters:
            raise UsageError("--lr-warmup-steps", "give --lr-warmup-iters only (both given)")
        cfg.lr_warmup_iters = warmup_steps * cfg.num_mini_batches
    cfg.check_flags()  # the rest of validate() runs in the launcher's preflight, after the path checks
    return cfg
