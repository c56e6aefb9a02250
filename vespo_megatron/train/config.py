"""Every knob of an RL training run in one dataclass; the command-line flags (Megatron-LM's names and meanings) are
defined in :mod:`vespo_megatron.train.flags`.

Batch vocabulary (Megatron-LM's meanings): a step draws ``rollout_batch_size`` prompts × ``n_samples_per_prompt``
responses (the rollout batch, R samples); ``global_batch_size`` G is the number of samples per optimizer step, so a
step takes N = R / G optimizer steps (``num_mini_batches``; staleness N: the last mini-batch is N−1 updates away from
π_old). Give either G or N (or both, consistent). ``micro_batch_size`` is samples per micro-batch per data-parallel
rank; with ``use_dynamic_batch_size`` micro-batches are cut by a token budget (``max_tokens_per_gpu``) instead.
Fully asynchronous mode: rollouts are produced while training runs, at most ``max_lag`` policy versions behind, and
μ is the rollout engine's log-prob.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from vespo_megatron.errors import UsageError
from vespo_megatron.objectives.config import RegularizerConfig

logger = logging.getLogger(__name__)

LOSSES = ("vespo", "vespo-lin", "vespo-sqrt", "grpo", "gspo", "sapo", "cispo")
REPLAY = ("off", "r2", "r3")
WEIGHT_SYNC = ("auto", "distributed", "disk", "tensor")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
DISPATCHERS = ("allgather", "alltoall", "flex")
RECOMPUTE_GRANULARITY = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
DEFAULT_MINI_BATCHES = 4  # N when neither --global-batch-size nor --num-mini-batches is given

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
    expert_tensor_parallel_size: int = 1
    sequence_parallel: Optional[bool] = None  # None: on when TP > 1 (the only TP layout here); see check_flags
    transformer_impl: str = "local"
    moe_grouped_gemm: bool = False
    moe_token_dispatcher_type: str = "alltoall"
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    loss: str = "vespo"
    loss_agg_mode: str = "token-mean"
    honour_agg_mode: bool = False
    official_aggregation: bool = False
    routing_replay: str = "off"
    rollout_batch_size: int = 8
    n_samples_per_prompt: int = 4
    global_batch_size: Optional[int] = None  # samples per optimizer step as given; see samples_per_optimizer_step
    num_mini_batches: Optional[int] = None  # N optimizer steps per RL step; None: from global_batch_size (or 4)
    micro_batch_size: int = 4
    use_dynamic_batch_size: bool = False
    max_tokens_per_gpu: Optional[int] = None
    max_new_tokens: int = 6
    temperature: float = 1.0
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_decay_style: str = "constant"
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None  # optimizer steps; None: every optimizer step of the run
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
    use_rollout_logprobs: bool = False  # μ = the engine's log-probs in synchronous mode too (no π_old pass)
    max_lag: int = 1
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0
    tensorboard_dir: Optional[str] = None
    log_interval: int = 1
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
        rollout = self.rollout_samples
        if self.num_mini_batches is None:  # N from G when G divides the rollout batch (else check_flags says so)
            if self.global_batch_size is None:
                self.num_mini_batches = DEFAULT_MINI_BATCHES
            elif self.global_batch_size > 0 and rollout % self.global_batch_size == 0:
                self.num_mini_batches = rollout // self.global_batch_size

    @property
    def rollout_samples(self) -> int:
        """R = rollout_batch_size × n_samples_per_prompt: the samples of one RL step."""
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def samples_per_optimizer_step(self) -> int:
        """G = R / N (``global_batch_size`` when given: it is kept as the user's input, N holds the resolved value)."""
        return self.rollout_samples // self.num_mini_batches

    @property
    def total_optimizer_steps(self) -> int:
        """train_iters × N: the learning-rate schedule's length (Megatron-LM's iterations)."""
        return self.train_iters * self.num_mini_batches

    def model_options(self) -> dict[str, Any]:
        """The keyword arguments of ``megatron.model.build_model`` these flags select (TE spec, dispatcher, grouped
        GEMM, recomputation: TransformerConfig fields)."""
        options: dict[str, Any] = dict(use_te=self.transformer_impl == "transformer_engine",
                                       dispatcher=self.moe_token_dispatcher_type,
                                       moe_grouped_gemm=self.moe_grouped_gemm)
        if self.recompute_granularity:
            options.update(recompute_granularity=self.recompute_granularity, recompute_method=self.recompute_method,
                           recompute_num_layers=self.recompute_num_layers)
        return options

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
        for name in ("rollout_batch_size", "n_samples_per_prompt", "micro_batch_size", "max_new_tokens",
                     "train_iters", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "context_parallel_size", "expert_tensor_parallel_size",
                     "log_interval"):
            if getattr(self, name) < 1:
                raise UsageError(_flag(name), f"must be >= 1, got {getattr(self, name)}")
        self._check_batch_flags()
        self._check_model_flags()
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
        self._check_lr_flags()
        self._check_data_flags()

    def _check_batch_flags(self) -> None:
        """G × N = R (Megatron-LM's --global-batch-size is samples per optimizer step) and the token budget."""
        rollout = (f"the rollout batch {self.rollout_samples} (= --rollout-batch-size {self.rollout_batch_size} × "
                   f"--n-samples-per-prompt {self.n_samples_per_prompt})")
        for name in ("global_batch_size", "num_mini_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(_flag(name), f"must be >= 1, got {value}")
        if self.num_mini_batches is None or self.rollout_samples % self.num_mini_batches:
            flag, value = (("--global-batch-size", self.global_batch_size) if self.num_mini_batches is None
                           else ("--num-mini-batches", self.num_mini_batches))
            raise UsageError(flag, f"{value} does not divide {rollout}")
        if self.global_batch_size is not None and self.global_batch_size * self.num_mini_batches != self.rollout_samples:
            raise UsageError("--global-batch-size", f"{self.global_batch_size} samples per optimizer step × "
                             f"--num-mini-batches {self.num_mini_batches} must equal {rollout}")
        if self.use_dynamic_batch_size and (self.max_tokens_per_gpu is None or self.max_tokens_per_gpu < 1):
            raise UsageError("--max-tokens-per-gpu", "required (>= 1) with --use-dynamic-batch-size, got "
                             f"{self.max_tokens_per_gpu}")
        if self.use_dynamic_batch_size and self.max_prompt_len:
            unit = 2 * self.context_parallel_size
            longest = -(-(self.max_prompt_len + self.max_new_tokens) // unit) * unit
            if self.max_tokens_per_gpu < longest:
                raise UsageError("--max-tokens-per-gpu", f"{self.max_tokens_per_gpu} < the longest sample "
                                 f"(--max-prompt-len + --max-new-tokens, padded to 2·cp) = {longest}")
        if self.max_tokens_per_gpu is not None and not self.use_dynamic_batch_size:
            raise UsageError("--max-tokens-per-gpu", "applies with --use-dynamic-batch-size; not given")

    def _check_model_flags(self) -> None:
        """Layouts and kernels: what this trainer runs, and a clear error for what this machine cannot."""
        if self.tensor_model_parallel_size > 1 and self.sequence_parallel is False:
            raise UsageError("--sequence-parallel", "tensor parallelism runs with sequence parallelism here (MoE "
                             "token dispatch and the packed layout are split over TP); it cannot be turned off")
        if self.tensor_model_parallel_size > 1 and self.sequence_parallel is None:
            logger.info("--tensor-model-parallel-size %d: sequence parallelism is on (pass --sequence-parallel, as "
                        "Megatron-LM MoE scripts do)", self.tensor_model_parallel_size)
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise UsageError("--transformer-impl", f"one of {', '.join(TRANSFORMER_IMPLS)}, got "
                             f"{self.transformer_impl!r}")
        if self.transformer_impl == "transformer_engine" and not _importable("transformer_engine"):
            raise UsageError("--transformer-impl", "transformer_engine needs NVIDIA Transformer Engine on a CUDA "
                             "machine (pip install 'vespo-megatron[gpu]'); use --transformer-impl local here")
        if self.moe_grouped_gemm and self.transformer_impl != "transformer_engine":
            raise UsageError("--moe-grouped-gemm", "needs --transformer-impl transformer_engine (TE's grouped GEMM "
                             "experts, CUDA)")
        if self.moe_token_dispatcher_type not in DISPATCHERS:
            raise UsageError("--moe-token-dispatcher-type", f"one of {', '.join(DISPATCHERS)}, got "
                             f"{self.moe_token_dispatcher_type!r}")
        if self.moe_token_dispatcher_type == "allgather":
            raise UsageError("--moe-token-dispatcher-type", "allgather does not take variable sequence lengths "
                             "(Megatron-Core), which packed RL batches are; use alltoall (or flex)")
        if self.moe_token_dispatcher_type == "flex" and not _importable("deep_ep"):
            raise UsageError("--moe-token-dispatcher-type", "flex needs DeepEP on a CUDA machine; use alltoall here")
        self._check_recompute_flags()

    def _check_recompute_flags(self) -> None:
        """Megatron-LM's rules: full needs a method and a layer count; selective takes neither."""
        granularity, method, layers = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if granularity is not None and granularity not in RECOMPUTE_GRANULARITY:
            raise UsageError("--recompute-granularity", f"full or selective, got {granularity!r}")
        if method is not None and method not in RECOMPUTE_METHODS:
            raise UsageError("--recompute-method", f"uniform or block, got {method!r}")
        if granularity == "full" and (method is None or layers is None or layers < 1):
            raise UsageError("--recompute-method" if method is None else "--recompute-num-layers",
                             "required with --recompute-granularity full (uniform|block, and a layer count >= 1)")
        if granularity != "full" and (method is not None or layers is not None):
            raise UsageError("--recompute-method" if method is not None else "--recompute-num-layers",
                             "applies with --recompute-granularity full only")

    def _check_lr_flags(self) -> None:
        """Megatron-Core's OptimizerParamScheduler's own constraints, as flag errors."""
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise UsageError("--lr-decay-style", f"one of {', '.join(LR_DECAY_STYLES)}, got {self.lr_decay_style!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise UsageError("--min-lr", f"must be in [0, --lr {self.lr}], got {self.min_lr}")
        decay = self.lr_decay_iters if self.lr_decay_iters is not None else self.total_optimizer_steps
        if decay < 1:
            raise UsageError("--lr-decay-iters", f"must be >= 1, got {decay}")
        if not 0 <= self.lr_warmup_iters < decay:
            raise UsageError("--lr-warmup-iters", f"must be in [0, {decay}) (the decay length in optimizer steps: "
                             "--lr-decay-iters, default --train-iters × N)")

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


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


