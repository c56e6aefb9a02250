"""The public API of the policy objectives, and the one place a policy loss is assembled (pure torch).

``compute_policy_loss(name, log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
rollout_log_prob=None, *, entropy=None, ref_log_prob=None, global_num_tokens=None, global_num_seqs=None,
loss_scale_factor=None, honour_agg_mode=False, regularizer=None, **hparams) -> (loss, metrics)``
    verl's padded convention: every tensor is [batch, response_len]; ``response_mask`` is 1 on response tokens
    (every row needs one); the sequence advantage (VESPO's sign source) is ``advantages[:, 0]``. ``loss`` is a
    scalar tensor carrying the gradient of ``log_prob``; ``metrics`` is a dict of floats. The batch is flattened to
    the packed form (sequence id = row) and handed to the same registry function as ``packed_policy_loss``.

``packed_policy_loss(name, inp: PackedPolicyInput, loss_agg_mode="token-mean", *, ...same keywords) -> (loss,
metrics)``: the same on the packed layout [num_tokens] with ``seq_ids``, for THD / context-parallel training.
Under context parallelism pass ``seq_sum`` = an all-reduce (sum) of a [k, num_seqs] tensor over the CP group: every
loss calls it exactly once in the forward pass (gspo with gspo_form="sequence" once more in the backward pass, on
the gradient); the returned loss is the rank's share and the CP ranks' shares add up to the full value.

Names (``POLICY_LOSSES``): vespo, vespo-lin, vespo-sqrt, grpo, gspo, sapo, cispo; formulas in ``losses``.
Hyper-parameters (``PolicyLossConfig``; official names accepted as aliases): c1_pos=2, c2_pos=3, c1_neg=3, c2_neg=2
(k_pos, lambda_pos, k_neg, lambda_neg); eps_low / eps_high (clip_ratio_low / clip_ratio_high; default 0.2 / 0.2,
gspo 3e-4 / 4e-4; eps_high=0.28 is clip-higher); clip_c=3 (clip_ratio_c, dual clip of grpo, None disables);
gspo_form="token" | "sequence"; tau_pos=1, tau_neg=1.05 (sapo); tis=False, tis_cap=2 (token-level TIS; needs
rollout_log_prob); mis=False, mis_low=0.5, mis_high=2 (sequence-level MIS; needs rollout_log_prob).

Aggregation (``aggregate``): token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm. By
default each call normalises by its own micro-batch (the official behaviour); pass ``global_num_tokens`` (token-mean)
or ``global_num_seqs`` (seq-mean-*) of the whole global batch to get contributions that add up to the exact global
value. ``loss_scale_factor`` is the constant of seq-mean-token-sum-norm (padded API default: response_len). gspo and
sapo always use seq-mean-token-mean as in the official fork unless ``honour_agg_mode=True``.

Regularisers (``regularizer=RegularizerConfig(kl_coef, kl_loss_type, entropy_coef)``, formulas in ``regularizers``):
kl_coef·kl_t(logπ_θ, ``ref_log_prob``) − entropy_coef·H_t (``entropy``, differentiable) is added to the per-token
loss and aggregated with it; metrics ``kl_loss`` / ``entropy_loss``.

Errors: ValueError naming the field for mismatched shapes, an empty batch, a mask without response token (or a row
without one in the padded API), log-probs above 0 (beyond 1e-4), non-finite advantages, unknown names / modes /
hyper-parameters and out-of-range hyper-parameters. NaN/inf log-probs are not errors: the affected token (token-level
losses) or sequence (vespo*, gspo) gets weight 0, and loss and gradients stay finite.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from vespo_megatron.objectives.aggregate import aggregate_loss, check_agg_mode
from vespo_megatron.objectives.config import PolicyLossConfig, RegularizerConfig
from vespo_megatron.objectives.losses import get_policy_loss
from vespo_megatron.objectives.packed import PackedPolicyInput
from vespo_megatron.objectives.regularizers import regularizer_terms


def effective_agg_mode(name: str, loss_agg_mode: str, honour_agg_mode: bool = False) -> str:
    """The mode actually used: the official forced mode of gspo/sapo unless honour_agg_mode, else loss_agg_mode."""
    check_agg_mode(loss_agg_mode)
    forced = get_policy_loss(name).official_agg_mode
    return forced if forced is not None and not honour_agg_mode else loss_agg_mode


def assemble_policy_loss(
    name: str,
    inp: PackedPolicyInput,
    cfg: PolicyLossConfig,
    loss_agg_mode: str = "token-mean",
    *,
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    loss_scale_factor: float | None = None,
    honour_agg_mode: bool = False,
    aggregate: Callable[[Tensor], Tensor] | None = None,
    regularizer: RegularizerConfig | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """THE assembly of a policy loss, used by every path (pure API, Megatron loss, integrations).

    Registry loss ``name`` on ``inp`` with hyper-parameters ``cfg`` -> per-token loss L_t [num_tokens], plus the
    ``regularizer`` R_t = kl_coef·kl_t − entropy_coef·H_t on the trained tokens (``regularizers``; needs
    ``inp.ref_log_prob`` / ``inp.entropy`` with its gradient), then ONE aggregation of L_t + R_t in
    :func:`effective_agg_mode` with the given global normalisers (None: this call's own), or by the caller's own
    normaliser ``aggregate`` of a per-token tensor [num_tokens] (a framework's, e.g. slime's sum_of_sample_mean).

    Returns:
        (scalar loss carrying the gradient of ``inp.log_prob`` (and of ``inp.entropy`` when entropy_coef != 0),
        float metrics; with a regulariser also ``kl_loss`` = agg(kl_t) and ``entropy_loss`` = agg(H_t), the terms
        without their coefficients, aggregated as the loss).
    """
    mode = effective_agg_mode(name, loss_agg_mode, honour_agg_mode)
    out = get_policy_loss(name).fn(inp, cfg)
    if aggregate is None:
        def aggregate(token_values: Tensor) -> Tensor:
            return aggregate_loss(token_values, inp.seq_ids, out.seq_token_counts, mode,
                                  global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
                                  loss_scale_factor=loss_scale_factor)

    token_loss, metrics = out.token_loss, out.metrics
    if regularizer is not None and regularizer.active:
        trained = inp.response_mask.bool() & (out.seq_token_counts[inp.seq_ids] > 0)
        term, parts = regularizer_terms(inp, trained, regularizer)
        token_loss = token_loss + term.to(token_loss.dtype)
        metrics = {**metrics, **{key: float(aggregate(value.to(token_loss.dtype))) for key, value in parts.items()}}
    return aggregate(token_loss), metrics


def packed_policy_loss(
    name: str,
    inp: PackedPolicyInput,
    loss_agg_mode: str = "token-mean",
    *,
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    loss_scale_factor: float | None = None,
    honour_agg_mode: bool = False,
    regularizer: RegularizerConfig | None = None,
    **hparams: Any,
) -> tuple[Tensor, dict[str, float]]:
    """Scalar loss and float metrics of policy loss ``name`` on the packed layout (see the module docstring)."""
    get_policy_loss(name)
    return assemble_policy_loss(
        name, inp, PolicyLossConfig.from_hparams(**hparams), loss_agg_mode,
        global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
        loss_scale_factor=loss_scale_factor, honour_agg_mode=honour_agg_mode, regularizer=regularizer,
    )


def compute_policy_loss(
    name: str,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    rollout_log_prob: Tensor | None = None,
    *,
    entropy: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    loss_scale_factor: float | None = None,
    honour_agg_mode: bool = False,
    regularizer: RegularizerConfig | None = None,
    **hparams: Any,
) -> tuple[Tensor, dict[str, float]]:
    """Policy loss ``name`` on verl's padded [batch, response_len] tensors (see the module docstring)."""
    get_policy_loss(name)
    if not isinstance(log_prob, Tensor) or log_prob.dim() != 2:
        got = tuple(log_prob.shape) if isinstance(log_prob, Tensor) else type(log_prob).__name__
        raise ValueError(f"log_prob: expected a [batch, response_len] tensor, got {got}")
    if log_prob.numel() == 0:
        raise ValueError(f"log_prob: empty batch, shape {tuple(log_prob.shape)}")
    padded = {"old_log_prob": old_log_prob, "advantages": advantages, "response_mask": response_mask,
              "rollout_log_prob": rollout_log_prob, "entropy": entropy, "ref_log_prob": ref_log_prob}
    for field, value in padded.items():
        if value is None and field in ("rollout_log_prob", "entropy", "ref_log_prob"):
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"{field}: expected a torch.Tensor, got {type(value).__name__}")
        if value.shape != log_prob.shape:
            raise ValueError(f"{field}: shape {tuple(value.shape)} differs from log_prob's {tuple(log_prob.shape)}")
    empty_rows = ((response_mask != 0).sum(dim=1) == 0).nonzero()
    if empty_rows.numel():
        raise ValueError(f"response_mask: row {int(empty_rows[0])} has no response token")
    batch, response_len = log_prob.shape
    flat = {field: None if value is None else value.reshape(-1) for field, value in padded.items()}
    inp = PackedPolicyInput(
        log_prob=log_prob.reshape(-1),
        seq_ids=torch.arange(batch, device=log_prob.device).repeat_interleave(response_len),
        seq_advantages=advantages[:, 0],
        num_seqs=batch,
        **flat,  # type: ignore[arg-type]
    )
    return packed_policy_loss(
        name, inp, loss_agg_mode,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        loss_scale_factor=response_len if loss_scale_factor is None else loss_scale_factor,
        honour_agg_mode=honour_agg_mode,
        regularizer=regularizer,
        **hparams,
    )
