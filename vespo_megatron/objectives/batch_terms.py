"""Per-token and per-sequence terms shared by all policy losses, formed with ONE ``seq_sum`` call.

Per response token t (m_t = 1): lr_t = clamp(logπ_θ − logπ_old, ±20); TIS weight
ρ_t = min(exp(clamp(logπ_old − logμ, ±20)), tis_cap) (detached). Per sequence i (global over CP ranks):
T_i = Σ m_t, S_i = Σ m_t·lr_t, Σ m_t·clamp(log max(ρ_t, 1e-8), ±20) (TIS), Σ m_t·(logπ_old − logμ) (MIS),
Σ m_t·(logπ_θ − logπ_old) unclamped (GSPO), Σ m_t·H_t (entropy), and the number of unusable response tokens.

Non-finite inputs: a response token whose log-probs (those the loss reads) are not all finite is unusable; its
values are replaced by 0 with ``torch.where`` before anything else, so no NaN/inf reaches the sums or the autograd
graph. A sequence with an unusable token is invalid: sequence-level losses give it weight 0 (as the official code
does for a NaN W) and MIS drops it. Unlike the official code, non-finite values on non-response tokens (padding) are
ignored instead of poisoning the row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vespo_megatron.objectives.config import PolicyLossConfig
from vespo_megatron.objectives.kernel import LOG_W_CLAMP, W_FLOOR
from vespo_megatron.objectives.packed import PackedPolicyInput, reduce_over_sequences

RawRatio = Literal["none", "detached", "differentiable"]


@dataclass(frozen=True)
class BatchTerms:
    """Sanitised token tensors [N] and global per-sequence sums [num_seqs]; see the module docstring."""

    inp: PackedPolicyInput
    log_prob: Tensor  # [N] logπ_θ on usable tokens, 0 elsewhere (carries the gradient)
    log_ratio: Tensor  # [N] clamp(logπ_θ − logπ_old, ±20) on usable tokens, 0 elsewhere (carries the gradient)
    advantages: Tensor  # [N] A_t on response tokens, 0 elsewhere
    mask: Tensor  # [N] 1.0 on response tokens of sequences kept by MIS
    usable: Tensor  # [N] bool: response token with finite log-probs
    tis_weight: Tensor | None  # [N] ρ_t on response tokens (None without TIS)
    seq_response_counts: Tensor  # [num_seqs] T_i, response tokens of every sequence
    seq_token_counts: Tensor  # [num_seqs] T_i of kept sequences (0 for dropped ones)
    seq_log_ratio: Tensor  # [num_seqs] S_i = Σ m·lr (detached)
    seq_raw_log_ratio: Tensor | None  # [num_seqs] Σ m·(logπ_θ − logπ_old) unclamped (gspo)
    seq_log_tis: Tensor | None  # [num_seqs] Σ m·clamp(log max(ρ, 1e-8), ±20)
    seq_entropy: Tensor | None  # [num_seqs] Σ m·H
    seq_valid: Tensor  # [num_seqs] bool: no unusable response token
    seq_kept: Tensor  # [num_seqs] bool: kept by MIS (all True without MIS)


def compute_batch_terms(inp: PackedPolicyInput, cfg: PolicyLossConfig, raw_ratio: RawRatio = "none") -> BatchTerms:
    """All shared terms of ``inp`` under ``cfg``; ``raw_ratio`` asks for GSPO's unclamped Σ lr (with grad or not)."""
    uses_rollout = cfg.tis or cfg.mis
    if uses_rollout and inp.rollout_log_prob is None:
        raise ValueError("rollout_log_prob: required when tis=True or mis=True")
    dtype = torch.promote_types(inp.log_prob.dtype, torch.float32)
    response = inp.response_mask.bool()
    log_prob = inp.log_prob.to(dtype)
    old = inp.old_log_prob.detach().to(dtype)
    rollout = inp.rollout_log_prob.detach().to(dtype) if uses_rollout else None
    usable = response & torch.isfinite(log_prob.detach()) & torch.isfinite(old)
    if rollout is not None:
        usable = usable & torch.isfinite(rollout)
    zero = log_prob.new_zeros(())
    log_prob = torch.where(usable, log_prob, zero)
    old = torch.where(usable, old, zero)
    log_ratio = torch.clamp(log_prob - old, -LOG_W_CLAMP, LOG_W_CLAMP)
    m = response.to(dtype)

    rows = {"count": m, "unusable": (response & ~usable).to(dtype), "log_ratio": m * log_ratio.detach()}
    if raw_ratio != "none":
        raw = m * (log_prob - old)
        rows["raw"] = raw if raw_ratio == "differentiable" else raw.detach()
    tis_weight = None
    if rollout is not None:
        old_minus_rollout = old - torch.where(usable, rollout, zero)
        if cfg.tis:
            tis_weight = torch.exp(old_minus_rollout.clamp(-LOG_W_CLAMP, LOG_W_CLAMP)).clamp(max=cfg.tis_cap) * m
            log_tis = torch.log(tis_weight.clamp(min=W_FLOOR)).clamp(-LOG_W_CLAMP, LOG_W_CLAMP)
            rows["log_tis"] = m * log_tis
        if cfg.mis:
            rows["mis"] = m * old_minus_rollout
    if inp.entropy is not None:
        entropy = inp.entropy.detach().to(dtype)
        rows["entropy"] = torch.where(response & torch.isfinite(entropy), entropy, zero)

    totals = dict(zip(rows, reduce_over_sequences(inp, list(rows.values()))))
    counts = totals["count"].detach()
    if not bool(counts.sum() > 0):
        raise ValueError("response_mask: no response token in the batch")
    seq_valid = totals["unusable"].detach() == 0
    seq_kept = torch.ones_like(seq_valid)
    if cfg.mis:
        ratio = torch.exp(totals["mis"].detach().clamp(-LOG_W_CLAMP, LOG_W_CLAMP))
        seq_kept = seq_valid & (ratio >= cfg.mis_low) & (ratio <= cfg.mis_high)
    return BatchTerms(
        inp=inp,
        log_prob=log_prob,
        log_ratio=log_ratio,
        advantages=torch.where(response, inp.advantages.detach().to(dtype), zero),
        mask=m * seq_kept[inp.seq_ids].to(dtype),
        usable=usable,
        tis_weight=tis_weight,
        seq_response_counts=counts,
        seq_token_counts=counts * seq_kept.to(dtype),
        seq_log_ratio=totals["log_ratio"].detach(),
        seq_raw_log_ratio=totals.get("raw"),
        seq_log_tis=_detached(totals.get("log_tis")),
        seq_entropy=_detached(totals.get("entropy")),
        seq_valid=seq_valid,
        seq_kept=seq_kept,
    )


def _detached(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.detach()
