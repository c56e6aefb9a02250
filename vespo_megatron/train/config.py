"""Every knob of an RL training run in one dataclass, with Megatron-LM-style command-line flags.

Batch vocabulary: a step draws ``rollout_batch_size`` prompts × ``n_samples_per_prompt`` responses (the global batch,
gbs), splits it into ``num_mini_batches`` = N = gbs/mbs mini-batches and takes one optimizer step per mini-batch
(staleness N: the last mini-batch is N−1 updates away from π_old). Fully asynchronous mode: rollouts are produced
while training runs, at most ``max_lag`` policy versions behind, and μ is the rollout engine's log-prob.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

LOSSES = ("vespo", "vespo-lin", "vespo-sqrt", "grpo", "gspo", "sapo", "cispo")
REPLAY = ("off", "r2", "r3")


@dataclass
class TrainConfig:
    hf_checkpoint: str = ""
    sglang_url: Optional[str] = None  # None: start the CPU engine (SGLang protocol server) in-process
    engine_dtype: str = "bf16"
    weight_sync: str = "disk"  # how weights reach the engine: "disk" (update_weights_from_disk) or "tensor"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    loss: str = "vespo"
    loss_agg_mode: str = "token-mean"
    official_aggregation: bool = False
    routing_replay: str = "off"
    rollout_batch_size: int = 8
    n_samples_per_prompt: int = 4
    num_mini_batches: int = 4
    micro_batch_size: int = 4
    max_new_tokens: int = 6
    temperature: float = 1.0
    lr: float = 1e-3
    lr_warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    train_iters: int = 10
    seed: int = 1234
    async_rollout: bool = False
    max_lag: int = 1
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0
    log_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    task_symbols: int = 8
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def global_batch_size(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    def validate(self) -> "TrainConfig":
        """Clear errors at start, before any work."""
        if self.loss not in LOSSES:
            raise ValueError(f"--loss: unknown policy loss {self.loss!r}; known: {', '.join(LOSSES)}")
        if self.routing_replay not in REPLAY:
            raise ValueError(f"--routing-replay: unknown mode {self.routing_replay!r}; known: {', '.join(REPLAY)}")
        for name in ("rollout_batch_size", "n_samples_per_prompt", "num_mini_batches", "micro_batch_size",
                     "max_new_tokens", "train_iters", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.num_mini_batches:
            raise ValueError(f"--num-mini-batches {self.num_mini_batches} does not divide the global batch "
                             f"{self.global_batch_size} (= rollout batch {self.rollout_batch_size} × "
                             f"{self.n_samples_per_prompt} samples per prompt)")
        if self.async_rollout and self.max_lag < 1:
            raise ValueError(f"--max-lag: must be >= 1 in asynchronous mode, got {self.max_lag}")
        if self.weight_sync not in ("disk", "tensor"):
            raise ValueError(f"--weight-sync: disk or tensor, got {self.weight_sync!r}")
        if self.engine_dtype not in ("bf16", "fp32"):
            raise ValueError(f"--engine-dtype: bf16 or fp32, got {self.engine_dtype!r}")
        from vespo_megatron.objectives.config import PolicyLossConfig

        PolicyLossConfig.from_hparams(**self.hparams)  # unknown or out-of-range --loss-hparam fails here
        if not self.hf_checkpoint:
            raise ValueError("--hf-checkpoint: required (a directory written by save_pretrained)")
        if self.lr <= 0 or self.clip_grad <= 0:
            raise ValueError("--lr and --clip-grad must be > 0")
        return self


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--tensor-model-parallel-size`` style); booleans are store_true."""
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "hparams":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default)
        elif f.name == "loss":
            parser.add_argument(flag, default=default, choices=LOSSES)
        elif f.name == "routing_replay":
            parser.add_argument(flag, default=default, choices=REPLAY)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default)
    parser.add_argument("--loss-hparam", action="append", default=[], metavar="KEY=VALUE",
                        help="policy-loss hyper-parameter, e.g. k_pos=2.0 or clip_ratio_high=0.28 (repeatable)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    hparams = {}
    for item in getattr(args, "loss_hparam", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--loss-hparam: expected KEY=VALUE, got {item!r}")
        hparams[key] = float(value)
    return TrainConfig(**values, hparams=hparams).validate()
