"""The policy loss handed to Megatron's ``get_forward_backward_func`` (last pipeline stage only).

Per micro-batch (one CP rank's label-aligned slots, see ``batch``):
1. logp_t, H_t from the vocabulary-parallel logits [t, V/tp] (``logprobs``; no vocabulary gather; H_t keeps its
   gradient when ``entropy_coef`` != 0: ∂H/∂z is part of the same fused backward);
2. the registered policy loss (``objectives``) on the packed tokens, plus kl_coef·kl_t(logp, ref_log_prob) −
   entropy_coef·H_t (``objectives.regularizers``) in the same assembly and aggregation; every per-sequence sum
   (Σ_t m·lr_t for logW, token counts) is this rank's partial sum, completed by ONE all-reduce of a [k, num_seqs]
   tensor over the context-parallel group (``cp_seq_sum``), never an all-gather of per-token tensors;
3. aggregation. Exact mode (default): normalised by the WHOLE global batch (response tokens or sequences of all
   micro-batches and data-parallel ranks, ``MicroBatch.global_tokens/global_seqs``), so the sum over micro-batches
   and ranks is the global token-mean whatever the micro-batch split. The model config sets
   ``calculate_per_token_loss=True`` so Megatron neither divides by the number of micro-batches nor averages over
   DP×CP: gradients are plain sums. Official mode: the micro-batch's own normaliser, divided by
   num_microbatches·dp (the paper's per-micro-batch behaviour).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from vespo_megatron.megatron.batch import MicroBatch
from vespo_megatron.megatron.logprobs import vocab_parallel_logprobs
from vespo_megatron.objectives.config import PolicyLossConfig, RegularizerConfig
from vespo_megatron.objectives.packed import PackedPolicyInput, SeqSum
from vespo_megatron.objectives.policy_loss import assemble_policy_loss, effective_agg_mode


REGULARIZER_METRICS = ("kl_loss", "entropy_loss")  # scaled like "loss": their sum over micro-batches and ranks is
# the step's value (summed, not averaged, by the trainer)


@dataclass(frozen=True)
class LossSettings:
    """name: registered policy loss; agg_mode: aggregation; exact_global: global normaliser (else official mode);
    old_from_rollout: use the rollout engine's log-probs as μ (fully asynchronous training);
    loss_scale_factor: the constant of seq-mean-token-sum-norm; honour_agg_mode: gspo/sapo use ``agg_mode`` instead
    of the official fork's seq-mean-token-mean (as in ``compute_policy_loss``); temperature: the rollout's sampling
    temperature τ (log-probs of logits / τ, as the engine's); kl_coef, kl_loss_type, entropy_coef: the regularisers
    (``--kl-coef`` needs ``MicroBatch.ref_log_prob``; with entropy_coef != 0 the entropy carries its gradient)."""

    name: str = "vespo"
    agg_mode: str = "token-mean"
    exact_global: bool = True
    old_from_rollout: bool = False
    loss_scale_factor: Optional[float] = None
    honour_agg_mode: bool = False
    temperature: float = 1.0
    hparams: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    kl_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        effective_agg_mode(self.name, self.agg_mode, self.honour_agg_mode)  # unknown loss or mode fails here
        _ = self.regularizer  # bad coefficients or KL type fail here

    @property
    def regularizer(self) -> RegularizerConfig:
        """The KL / entropy terms added in the loss assembly."""
        return RegularizerConfig(kl_coef=self.kl_coef, kl_loss_type=self.kl_loss_type, entropy_coef=self.entropy_coef)


def cp_seq_sum(group: Optional[dist.ProcessGroup]) -> SeqSum:
    """The ``seq_sum`` of the objectives: all-reduce (sum) of a [k, num_seqs] tensor over ``group``."""
    if group is None or dist.get_world_size(group) == 1:
        return lambda local: local

    def reduce(local: torch.Tensor) -> torch.Tensor:
        out = local.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    return reduce


def token_logprobs(output: torch.Tensor, mb: MicroBatch, vocab_size: int, inplace: bool,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logp [t], entropy [t] of ``mb.labels`` from the model output [1, t, V/tp] divided by ``temperature``."""
    group = parallel_state.get_tensor_model_parallel_group()
    return vocab_parallel_logprobs(
        output[0], mb.labels, vocab_size=vocab_size, group=group, inplace_backward=inplace, temperature=temperature
    )


def policy_loss(
    output: torch.Tensor,
    mb: MicroBatch,
    settings: LossSettings,
    vocab_size: int,
    num_microbatches: int,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(loss share, local response tokens, metrics) for Megatron's 3-tuple loss convention."""
    logp, entropy = token_logprobs(output, mb, vocab_size, inplace=True, temperature=settings.temperature)
    seq_sum = cp_seq_sum(parallel_state.get_context_parallel_group())
    dp = parallel_state.get_data_parallel_world_size()
    return objective(logp, entropy, mb, settings, num_microbatches * dp, seq_sum)


def objective(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    mb: MicroBatch,
    settings: LossSettings,
    official_divisor: int,
    seq_sum: SeqSum,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The loss of one CP rank's slots from its per-slot logp [t] (with grad) and entropy [t].

    ``official_divisor``: num_microbatches·dp, applied in official (per-micro-batch) mode only.
    """
    old = mb.rollout_log_prob if settings.old_from_rollout else mb.old_log_prob
    if old is None:
        raise ValueError("old_log_prob: missing; run the old-log-prob pass first (or use rollout log-probs)")
    reg = settings.regularizer
    if reg.kl_coef and mb.ref_log_prob is None:
        raise ValueError("ref_log_prob: missing; --kl-coef needs the reference pass (Reference.log_probs) first")
    mask = mb.loss_mask
    if settings.old_from_rollout:
        mask = mask * mb.rollout_valid.to(mask.dtype)
    dtype = logp.dtype
    inp = PackedPolicyInput(
        log_prob=logp,
        old_log_prob=old.to(dtype),
        advantages=mb.advantages.to(dtype),
        response_mask=mask.to(dtype),
        seq_ids=mb.seq_ids,
        seq_advantages=mb.seq_advantages.to(dtype),
        num_seqs=mb.num_seqs,
        rollout_log_prob=None if mb.rollout_log_prob is None else mb.rollout_log_prob.to(dtype),
        entropy=entropy if reg.entropy_coef else entropy.detach(),
        seq_sum=seq_sum,
        ref_log_prob=None if mb.ref_log_prob is None else mb.ref_log_prob.to(dtype),
    )
    exact = settings.exact_global
    loss, loss_metrics = assemble_policy_loss(
        settings.name, inp, settings.hparams, settings.agg_mode,
        global_num_tokens=mb.global_tokens if exact else None, global_num_seqs=mb.global_seqs if exact else None,
        loss_scale_factor=settings.loss_scale_factor, honour_agg_mode=settings.honour_agg_mode, regularizer=reg,
    )
    if not exact:
        loss = loss / official_divisor
        loss_metrics.update({key: loss_metrics[key] / official_divisor for key in REGULARIZER_METRICS
                             if key in loss_metrics})
    local_tokens = mask.sum().to(torch.int)
    metrics = {**loss_metrics, "loss": loss.detach(), "entropy_sum": (entropy.detach() * mask).sum(),
               "response_tokens": local_tokens}
    return loss, local_tokens, metrics


def logprob_only(output: torch.Tensor, mb: MicroBatch, vocab_size: int,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Forward-only pass (π_old): returns per-slot logp [t] and entropy [t] of logits / τ in the metrics dict."""
    logp, entropy = token_logprobs(output, mb, vocab_size, inplace=False, temperature=temperature)
    zero = torch.zeros((), dtype=logp.dtype)
    return zero, torch.zeros((), dtype=torch.int), {"log_prob": logp.detach(), "entropy": entropy.detach()}
