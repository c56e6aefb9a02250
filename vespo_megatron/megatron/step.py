"""One training step and the old-log-prob pass on a (DDP-wrapped) Megatron model.

``wrap_ddp`` wraps the model in Megatron's DistributedDataParallel (gradient buffers ``param.main_grad``,
``finalize_model_grads`` for DP all-reduce or, with the distributed optimizer, reduce-scatter; SP/q-k norm all-reduce
over TP, tied embeddings over PP); a bf16 model (``config.bf16``) goes in Megatron's ``Float16Module`` first (bf16
compute, fp32 logits out of the last stage, so log-probs, log-ratio sums and the VESPO kernel run in fp32) and its
gradients are accumulated and reduced in fp32.
``forward_backward`` runs the micro-batches through ``get_forward_backward_func`` (any PP schedule) with the
policy loss; ``old_log_probs`` runs them forward only and returns each micro-batch's per-slot log-probs [t] (last
pipeline stage; None elsewhere). ``build_optimizer`` makes Megatron's optimizer over the DDP model: Adam over fp32
main params and grads (bf16: ``Float16OptimizerWithFloat16Params``; ``use_distributed_optimizer``: Megatron's
``DistributedOptimizer``, the main params and Adam state sharded over the data-parallel ranks).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core import optimizer as megatron_optimizer
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from vespo_megatron.megatron.batch import MicroBatch
from vespo_megatron.megatron.device import local_device
from vespo_megatron.megatron.loss import LossSettings, logprob_only, policy_loss


def _finalize_without_token_scaling(models: list, num_tokens: Optional[torch.Tensor] = None, **kwargs: Any) -> None:
    """Our losses are already normalised by the global batch: reduce gradients, never divide by num_tokens."""
    finalize_model_grads(models, None, **kwargs)


def mixed_precision(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as every forward pass sees it: in Megatron's ``Float16Module`` when ``model.config.bf16`` (bf16
    inputs in, fp32 logits out of the last stage), else itself."""
    return Float16Module(model.config, model) if model.config.bf16 else model


def wrap_ddp(model: torch.nn.Module, use_distributed_optimizer: bool = False) -> DistributedDataParallel:
    """Megatron DDP around ``model`` (in ``Float16Module`` when ``model.config.bf16``; no overlap; grads in
    param.main_grad, fp32 for a bf16 model).

    Args:
        model: the GPTModel of this stage (``build_model``).
        use_distributed_optimizer: lay the grad buffers out for Megatron's DistributedOptimizer (reduce-scatter of
            the grads, all-gather of the updated params); ``build_optimizer`` must then get the same flag.
    Returns:
        The DDP-wrapped model.
    """
    config = model.config
    config.calculate_per_token_loss = True
    module = mixed_precision(model)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=config.bf16, overlap_grad_reduce=False,
                                      use_distributed_optimizer=use_distributed_optimizer),
        module=module,
    )
    config.finalize_model_grads_func = _finalize_without_token_scaling
    config.no_sync_func = ddp.no_sync
    return ddp


def build_optimizer(ddp: DistributedDataParallel, *, lr: float, weight_decay: float, adam_beta1: float,
                    adam_beta2: float, clip_grad: float, min_lr: float = 0.0) -> Any:
    """Megatron's Adam (``get_megatron_optimizer``) over the DDP model's parameters.

    Precision and sharding follow the model and ``wrap_ddp``: a bf16 model gets fp32 main params (Megatron's mixed
    precision optimizer), the distributed optimizer is used when the DDP buffers were laid out for it. Main params
    are fp32 (the model's own params for an fp32 or fp64 model, fp64 being the exactness tests' precision).
    ``lr`` and ``min_lr`` become every param group's ``max_lr``/``min_lr`` (the learning-rate schedule's bounds); they
    are part of the key a checkpoint's param groups are matched by (megatron-core >= 0.17), so they are set here, before
    any ``--load``, and not later by the scheduler.
    """
    model_config = ddp.config
    config = megatron_optimizer.OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=adam_beta1, adam_beta2=adam_beta2,
        clip_grad=clip_grad, params_dtype=model_config.params_dtype, bf16=model_config.bf16,
        use_distributed_optimizer=ddp.ddp_config.use_distributed_optimizer)
    return megatron_optimizer.get_megatron_optimizer(config, [ddp])


def _run(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch],
    loss_fn: Callable[[MicroBatch, torch.Tensor], tuple],
    forward_only: bool,
) -> list[dict]:
    if not micro_batches:
        raise ValueError("micro_batches: empty")

    def forward_step(data_iterator, module):
        mb = next(data_iterator)
        output = module(mb.tokens[None], mb.position_ids[None], None, packed_seq_params=mb.packed_seq_params())
        return output, partial(loss_fn, mb)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=max(mb.tokens.numel() for mb in micro_batches),
        micro_batch_size=1,
        forward_only=forward_only,
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def vocab_size_of(model: torch.nn.Module) -> int:
    return int(unwrap(model).hf_config.vocab_size)


def forward_backward(model: torch.nn.Module, micro_batches: Sequence[MicroBatch], settings: LossSettings) -> list[dict]:
    """Forward + backward of every micro-batch; returns the per-micro-batch metrics (last stage; [] elsewhere)."""
    vocab = vocab_size_of(model)
    n = len(micro_batches)

    def loss_fn(mb: MicroBatch, output: torch.Tensor):
        return policy_loss(output, mb, settings, vocab, n)

    return _run(model, micro_batches, loss_fn, forward_only=False)


@torch.no_grad()
def old_log_probs(model: torch.nn.Module, micro_batches: Sequence[MicroBatch],
                  temperature: float = 1.0) -> list[Optional[torch.Tensor]]:
    """π_old per slot [t] (of logits / ``temperature``) for each micro-batch (forward only); None on stages other
    than the last."""
    vocab = vocab_size_of(model)
    out = _run(model, micro_batches, lambda mb, output: logprob_only(output, mb, vocab, temperature),
               forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return [None] * len(micro_batches)
    return [item["log_prob"] for item in out]


def logprob_mismatch(micro_batches: Sequence[MicroBatch]) -> dict[str, float]:
    """Train-inference mismatch of a step: over the response tokens that have both log-probs (all ranks),
    ``mismatch/logp_diff`` = mean(logπ_old − logμ) and ``mismatch/logp_abs_diff`` = mean|logπ_old − logμ|, with
    π_old [t] the trainer's recomputed log-probs and μ [t] the rollout engine's. A collective over every rank; ranks
    other than the last stage's TP rank 0 contribute nothing (their slots are copies or hold no log-probs)."""
    sums = torch.zeros(3, dtype=torch.float64, device=local_device())
    owner = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    for mb in micro_batches if owner else ():
        if mb.old_log_prob is None or mb.rollout_log_prob is None:
            continue
        keep = mb.loss_mask.bool() & mb.rollout_valid.bool()
        diff = (mb.old_log_prob.detach() - mb.rollout_log_prob.to(mb.old_log_prob.dtype))[keep].to(torch.float64)
        sums += torch.stack([diff.sum(), diff.abs().sum(), diff.new_tensor(float(diff.numel()))])
    torch.distributed.all_reduce(sums)
    tokens = float(sums[2])
    if tokens == 0:
        return {}
    return {"mismatch/logp_diff": float(sums[0]) / tokens, "mismatch/logp_abs_diff": float(sums[1]) / tokens}


def zero_grads(model: torch.nn.Module) -> None:
    if hasattr(model, "zero_grad_buffer"):
        model.zero_grad_buffer()
    for param in model.parameters():
        param.grad = None
