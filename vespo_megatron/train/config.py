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

from vespo_megatron.errors import UsageError
from vespo_megatron.objectives.config import KL_LOSS_TYPES, RegularizerConfig

LOSSES = ("vespo", "vespo-lin", "vespo-sqrt", "grpo", "gspo", "sapo", "cispo")
REPLAY = ("off", "r2", "r3")
WEIGHT_SYNC = ("auto", "distributed", "disk", "tensor")

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
    "num_mini_batches": "N = optimizer steps per RL step (staleness N)",
    "micro_batch_size": "samples per micro-batch",
    "max_new_tokens": "response length limit in tokens (alias --max-new-tokens)",
    "temperature": "sampling temperature; training log-probs are those of logits / temperature (alias --temperature)",
    "rollout_top_p": "nucleus sampling: keep the most likely tokens up to this probability mass",
    "rollout_top_k": "sample among the k most likely tokens (-1: all)",
    "rollout_stop": "stop string (repeatable; needs a server that detokenises, e.g. SGLang)",
    "rollout_stop_token_ids": "extra stop token ids, besides the model's EOS (generation_config.json, tokenizer)",
    "lr": "learning rate",
    "lr_warmup_steps": "linear warm-up steps of the learning rate",
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
    "train_iters": "RL steps to run",
    "seed": "random seed",
    "async_rollout": "fully asynchronous rollouts (μ = the engine's log-probs)",
    "max_lag": "largest policy lag of an asynchronous rollout",
    "save": "checkpoint directory to save to",
    "load": "checkpoint directory to resume from",
    "save_interval": "save every N steps (0: only at the end)",
    "log_dir": "TensorBoard / metrics.jsonl directory",
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
REWARD_ERRORS = ("raise", "zero")
ESTIMATORS = ("grpo", "dr-grpo", "rloo", "reinforce++-baseline")


@dataclass
class TrainConfig:
    hf_checkpoint: str = ""
    sglang_url: Optional[list[str]] = None  # None: start the CPU engine (SGLang protocol server) in-process
    engine_dtype: str = "bf16"
    weight_sync: str = "auto"  # auto, distributed, disk or tensor (WEIGHT_SYNC)
    weight_sync_bucket_mb: int = 512
    weight_sync_master_addr: Optional[str] = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    loss: str = "vespo"
    loss_agg_mode: str = "token-mean"
    honour_agg_mode: bool = False
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
    bf16: bool = False
    use_distributed_optimizer: bool = False
    kl_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    entropy_coef: float = 0.0
    ref_load: Optional[str] = None
    train_iters: int = 10
    seed: int = 1234
    async_rollout: bool = False
    max_lag: int = 1
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0
    log_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    rollout_top_p: float = 1.0
    rollout_top_k: int = -1
    rollout_stop: list[str] = field(default_factory=list)
    rollout_stop_token_ids: list[int] = field(default_factory=list)
    task_symbols: int = 8
    prompt_data: Optional[str] = None
    input_key: str = "prompt"
    label_key: Optional[str] = None
    metadata_key: Optional[str] = None
    apply_chat_template: bool = False
    tokenizer: Optional[str] = None
    rollout_shuffle: bool = False
    max_prompt_len: Optional[int] = None
    prompt_data_bad_rows: str = "error"
    reward: Optional[str] = None
    custom_reward_path: Optional[str] = None
    reward_errors: str = "raise"
    advantage_estimator: str = "grpo"
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 8
    eval_prompt_data: list[list[str]] = field(default_factory=list)
    eval_interval: int = 0
    n_samples_per_eval_prompt: int = 1
    eval_greedy: bool = False
    hparams: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.sglang_url, str):  # one engine given as a plain URL
            self.sglang_url = [self.sglang_url]

    @property
    def global_batch_size(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    def validate(self) -> "TrainConfig":
        """Clear errors at start, before any work (:class:`UsageError` naming the flag)."""
        self.check_flags()
        from vespo_megatron.objectives.config import PolicyLossConfig

        try:
            PolicyLossConfig.from_hparams(**self.hparams)  # unknown or out-of-range --loss-hparam fails here
        except ValueError as err:
            raise UsageError("--loss-hparam", str(err)) from err
        if self.kl_coef and self.ref_load:  # a directory without a usable reference fails here (no torch import)
            from vespo_megatron import preflight

            preflight.model_checkpoint_or_save(self.ref_load, "--ref-load")
        return self

    def check_flags(self) -> None:
        """The checks of :meth:`validate` that need no import beyond the standard library."""
        if self.loss not in LOSSES:
            raise UsageError("--loss", f"unknown policy loss {self.loss!r}; known: {', '.join(LOSSES)}")
        if self.routing_replay not in REPLAY:
            raise UsageError("--routing-replay", f"unknown mode {self.routing_replay!r}; known: {', '.join(REPLAY)}")
        for name in ("rollout_batch_size", "n_samples_per_prompt", "num_mini_batches", "micro_batch_size",
                     "max_new_tokens", "train_iters", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise UsageError(_flag(name), f"must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.num_mini_batches:
            raise UsageError("--num-mini-batches", f"{self.num_mini_batches} does not divide the global batch "
                             f"{self.global_batch_size} (= rollout batch {self.rollout_batch_size} × "
                             f"{self.n_samples_per_prompt} samples per prompt)")
        if self.async_rollout and self.max_lag < 1:
            raise UsageError("--max-lag", f"must be >= 1 in asynchronous mode, got {self.max_lag}")
        if self.weight_sync not in WEIGHT_SYNC:
            raise UsageError("--weight-sync", f"one of {', '.join(WEIGHT_SYNC)}, got {self.weight_sync!r}")
        if self.weight_sync_bucket_mb < 1:
            raise UsageError("--weight-sync-bucket-mb", f"must be >= 1, got {self.weight_sync_bucket_mb}")
        if self.sglang_url is not None and len(set(self.sglang_url)) != len(self.sglang_url):
            raise UsageError("--sglang-url", f"an engine is given twice: {self.sglang_url}")
        if self.engine_dtype not in ("bf16", "fp32"):
            raise UsageError("--engine-dtype", f"bf16 or fp32, got {self.engine_dtype!r}")
        if not self.hf_checkpoint:
            raise UsageError("--hf-checkpoint", "required (a directory written by save_pretrained)")
        for name in ("lr", "clip_grad", "temperature"):
            if not getattr(self, name) > 0:
                raise UsageError(_flag(name), f"must be > 0, got {getattr(self, name)}")
        self._check_data_flags()

    def _check_data_flags(self) -> None:
        """Data, reward, advantage, generation and evaluation flags (the files are checked in the preflight)."""
        if not 0 < self.rollout_top_p <= 1:
            raise UsageError("--rollout-top-p", f"must be in (0, 1], got {self.rollout_top_p}")
        if self.rollout_top_k != -1 and self.rollout_top_k < 1:
            raise UsageError("--rollout-top-k", f"-1 (all tokens) or >= 1, got {self.rollout_top_k}")
        if any(t < 0 for t in self.rollout_stop_token_ids):
            raise UsageError("--rollout-stop-token-ids", f"ids must be >= 0, got {self.rollout_stop_token_ids}")
        if self.prompt_data_bad_rows not in ("error", "skip"):
            raise UsageError("--prompt-data-bad-rows", f"error or skip, got {self.prompt_data_bad_rows!r}")
        if self.max_prompt_len is not None and self.max_prompt_len < 1:
            raise UsageError("--max-prompt-len", f"must be >= 1, got {self.max_prompt_len}")
        if self.reward_errors not in REWARD_ERRORS:
            raise UsageError("--reward-errors", f"raise or zero, got {self.reward_errors!r}")
        if self.advantage_estimator not in ESTIMATORS:
            raise UsageError("--advantage-estimator", f"unknown estimator {self.advantage_estimator!r}; known: "
                             f"{', '.join(ESTIMATORS)}")
        if self.dynamic_sampling_max_rounds < 1:
            raise UsageError("--dynamic-sampling-max-rounds", f"must be >= 1, got {self.dynamic_sampling_max_rounds}")
        if self.rollout_stop and self.sglang_url is None:
            raise UsageError("--rollout-stop", "stop strings need a server that detokenises (--sglang-url); the CPU "
                             "engine has no tokenizer: use --rollout-stop-token-ids")
        if self.prompt_data and not (self.reward or self.custom_reward_path):
            raise UsageError("--reward", "required with --prompt-data (or --custom-reward-path module:function)")
        if self.apply_chat_template and not self.prompt_data:
            raise UsageError("--apply-chat-template", "applies to --prompt-data prompts; none given")
        names = [name for name, _ in self.eval_prompt_data]
        if len(set(names)) != len(names):
            raise UsageError("--eval-prompt-data", f"eval set names must be unique, got {names}")
        if self.eval_prompt_data and not self.prompt_data:
            raise UsageError("--eval-prompt-data", "evaluation needs --prompt-data (the keys and the tokenizer)")
        if self.eval_interval < 0 or self.n_samples_per_eval_prompt < 1:
            raise UsageError("--eval-interval" if self.eval_interval < 0 else "--n-samples-per-eval-prompt",
                             "must be >= 0 (interval) and >= 1 (samples)")
        if self.eval_prompt_data and not self.eval_interval:
            raise UsageError("--eval-interval", "set it (> 0) to evaluate the --eval-prompt-data sets")
        try:  # --kl-coef, --kl-loss-type, --entropy-coef (the ValueError names the flag)
            RegularizerConfig(kl_coef=self.kl_coef, kl_loss_type=self.kl_loss_type, entropy_coef=self.entropy_coef)
        except ValueError as err:
            flag, _, what = str(err).partition(": ")
            raise UsageError(flag, what) from None
        if self.ref_load and not self.kl_coef:
            raise UsageError("--ref-load", "the reference is used only by the KL term; set --kl-coef > 0")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--tensor-model-parallel-size`` style); booleans are store_true."""
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "hparams":
            continue
        flag, default, text = _flag(f.name), getattr(defaults, f.name), HELP[f.name]
        if f.name in ALIASES:
            parser.add_argument(*ALIASES[f.name], dest=f.name, type=type(default), default=default, help=text)
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default, help=text)
        elif f.name == "eval_prompt_data":
            parser.add_argument(flag, nargs=2, action="append", default=[], metavar=("NAME", "PATH"), help=text)
        elif f.name in ("rollout_stop", "rollout_stop_token_ids"):
            parser.add_argument(flag, action="append", default=[], help=text,
                                type=int if f.name.endswith("ids") else str)
        elif f.name in ("max_prompt_len",):
            parser.add_argument(flag, type=int, default=default, help=text)
        elif f.name == "advantage_estimator":
            parser.add_argument(flag, default=default, choices=ESTIMATORS, help=text)
        elif f.name == "loss":
            parser.add_argument(flag, default=default, choices=LOSSES, help=text)
        elif f.name == "routing_replay":
            parser.add_argument(flag, default=default, choices=REPLAY, help=text)
        elif f.name == "sglang_url":
            parser.add_argument(flag, action="append", default=None, metavar="URL", help=text)
        elif f.name == "weight_sync":
            parser.add_argument(flag, default=default, choices=WEIGHT_SYNC, help=text)
        elif f.name == "hf_checkpoint":
            parser.add_argument(flag, required=True, metavar="DIR", help=text)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--loss-hparam", action="append", default=[], metavar="KEY=VALUE",
                        help="policy-loss hyper-parameter, e.g. k_pos=2.0 or clip_ratio_high=0.28 (repeatable)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    hparams = {}
    for item in getattr(args, "loss_hparam", []):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            hparams[key] = float(value)
        except ValueError:
            raise UsageError("--loss-hparam", f"expected KEY=NUMBER, got {item!r}") from None
    cfg = TrainConfig(**values, hparams=hparams)
    cfg.check_flags()  # the rest of validate() runs in the launcher's preflight, after the path checks
    return cfg
