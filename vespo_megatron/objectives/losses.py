"""One registry of policy losses, one signature: ``fn(inp: PackedPolicyInput, cfg) -> PolicyLossOutput``.

Per response token t of sequence i, with lr_t = clamp(logπ_θ − logπ_old, ±20), r_t = exp(lr_t)·ρ_t (ρ_t = TIS weight
when enabled, else 1), A_t the token advantage and Â_i the sequence advantage (signs of the official fork):

- vespo / vespo-lin / vespo-sqrt: L_t = −φ_i·A_t·logπ_θ(y_t), φ_i = kernel(logW_i; (c1, c2) by sign of Â_i),
  logW_i = clamp((S_i [+ Σ log ρ]) / g(T_i), ±20), g = 1, T, √T (see ``kernel``). φ is detached.
- grpo: L_t = max(−A·r, −A·clip(r, 1 − ε_lo, 1 + ε_hi)), and for A < 0 min(that, −A·c) (dual clip).
- gspo: s_i = exp(min(Σ_t m·(logπ_θ − logπ_old) / T_i, 10)) (unclamped token lr); token form (default, the fork's):
  log s_it = logπ_θ − sg(logπ_θ) + sg(log s_i); sequence form: the gradient flows through s_i itself.
  L_t = max(−A·s·ρ, −A·clip(s·ρ, 1 − ε_lo, 1 + ε_hi)), ε default (3e-4, 4e-4).
- sapo: L_t = −f(r)·A, f(r) = σ(τ(r − 1))·4/τ, τ = tau_pos if A_t > 0 else tau_neg.
- cispo: L_t = −sg(clip(exp(lr), 1 − ε_lo, 1 + ε_hi))·A·logπ_θ·ρ (TIS multiplies the loss here).
TIS (token-level, fork semantics) multiplies the ratio before clipping/gating in grpo, gspo and sapo, and enters
VESPO's logW. MIS drops whole sequences (their tokens leave the loss and the normalisers).

Each function returns the per-token loss [N] (0 on tokens that are not trained), the global token counts of the kept
sequences [num_seqs] that the aggregation divides by, and float metrics. Sequence-level metrics are global; the
token-level diagnostics (actor/pg_clipfrac, actor/pg_clipfrac_lower, actor/ppo_kl) are means over the local tokens.
Every loss calls ``seq_sum`` exactly once in the forward pass; gspo with gspo_form="sequence" once more in backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from vespo_megatron.objectives.batch_terms import BatchTerms, compute_batch_terms
from vespo_megatron.objectives.config import PolicyLossConfig
from vespo_megatron.objectives.kernel import LogWTransform, phi, sequence_log_w, sign_parameters
from vespo_megatron.objectives.metrics import sequence_metrics, to_floats, vespo_metrics
from vespo_megatron.objectives.packed import PackedPolicyInput

DEFAULT_CLIP = (0.2, 0.2)  # grpo and cispo (the fork's config)
GSPO_DEFAULT_CLIP = (3e-4, 4e-4)  # GSPO paper and verl's GSPO example scripts
GSPO_LOG_RATIO_MAX = 10.0


@dataclass(frozen=True)
class PolicyLossOutput:
    """token_loss [N]; seq_token_counts [num_seqs] (global T_i of kept sequences); metrics as floats."""

    token_loss: Tensor
    seq_token_counts: Tensor
    metrics: dict[str, float]


LossFn = Callable[[PackedPolicyInput, PolicyLossConfig], PolicyLossOutput]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss; ``official_agg_mode`` is the aggregation the fork forces whatever loss_agg_mode says."""

    fn: LossFn
    official_agg_mode: str | None = None


POLICY_LOSSES: dict[str, LossSpec] = {}


def register_policy_loss(name: str, official_agg_mode: str | None = None) -> Callable[[LossFn], LossFn]:
    """Decorator adding ``fn`` to POLICY_LOSSES under ``name``."""

    def add(fn: LossFn) -> LossFn:
        POLICY_LOSSES[name] = LossSpec(fn, official_agg_mode)
        return fn

    return add


def get_policy_loss(name: str) -> LossSpec:
    """The registered loss ``name``; ValueError listing the known names otherwise."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"name: unknown policy loss {name!r}; known: {', '.join(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def _vespo(inp: PackedPolicyInput, cfg: PolicyLossConfig, transform: LogWTransform) -> PolicyLossOutput:
    terms = compute_batch_terms(inp, cfg)
    seq_total = terms.seq_log_ratio if terms.seq_log_tis is None else terms.seq_log_ratio + terms.seq_log_tis
    log_w = sequence_log_w(seq_total, terms.seq_response_counts, transform)
    c1, c2 = sign_parameters(inp.seq_advantages.to(log_w.dtype), cfg.c1_pos, cfg.c2_pos, cfg.c1_neg, cfg.c2_neg)
    w, weight = phi(log_w, c1, c2)
    weight = torch.where(terms.seq_valid, weight, torch.zeros_like(weight))
    token_loss = -weight[inp.seq_ids] * terms.advantages * terms.log_prob * terms.mask
    kernel_params = (cfg.c1_pos, cfg.c2_pos, cfg.c1_neg, cfg.c2_neg)
    metrics = _sequence_metrics(terms)
    metrics.update(vespo_metrics(log_w, w, weight, inp.seq_advantages, _active(terms), kernel_params,
                                 terms.seq_log_tis))
    return PolicyLossOutput(token_loss, terms.seq_token_counts, metrics)


@register_policy_loss("vespo")
def vespo_loss(inp: PackedPolicyInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """VESPO with the true sequence product W = Π_t r_t (the paper's objective)."""
    return _vespo(inp, cfg, "product")


@register_policy_loss("vespo-lin")
def vespo_lin_loss(inp: PackedPolicyInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """Ablation: kernel applied to logW / T (geometric-mean ratio)."""
    return _vespo(inp, cfg, "lin")


@register_policy_loss("vespo-sqrt")
def vespo_sqrt_loss(inp: PackedPolicyInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """Ablation: kernel applied to logW / √T."""
    return _vespo(inp, cfg, "sqrt")


@register_policy_loss("grpo")
def grpo_loss(inp: PackedPolicyInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """PPO token clip with separate ε_lo / ε_hi (clip-higher) and dual clip c for A < 0."""
    terms = compute_batch_terms(inp, cfg)
    low, high = cfg.clip_range(DEFAULT_CLIP)
    adv = terms.advantages
    ratio = _with_tis(torch.exp(terms.log_ratio), terms)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
    loss = torch.maximum(unclipped, clipped)
    lower_clipped = torch.zeros_like(loss, dtype=torch.bool)
    if cfg.clip_c is not None:
        bound = -adv * cfg.clip_c
        lower_clipped = (adv < 0) & (loss > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    trained = _trained(terms)
    local = {"actor/pg_clipfrac": clipped > unclipped, "actor/pg_clipfrac_lower": lower_clipped}
    return _token_level_output(loss * trained, terms, trained, local)


@register_policy_loss("gspo", official_agg_mode="seq-mean-token-mean")
def gspo_loss(inp: PackedPolicyInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """GSPO: clipped geometric-mean sequence ratio, token form (default) or sequence form."""
    sequence_form = cfg.gspo_form == "sequence"
    terms = compute_batch_terms(inp, cfg, raw_ratio="differentiable" if sequence_form else "detached")
    assert terms.seq_raw_log_ratio is not None
    mean_log_ratio = terms.seq_raw_log_ratio / terms.seq_response_counts.clamp(min=1)
    if sequence_form:
        log_s = mean_log_ratio.clamp(max=GSPO_LOG_RATIO_MAX)[inp.seq_ids]
    else:
        detached_mean = mean_log_ratio.detach()[inp.seq_ids]
        log_s = (terms.log_prob - terms.log_prob.detach() + detached_mean).clamp(max=GSPO_LOG_RATIO_MAX)
    low, high = cfg.clip_range(GSPO_DEFAULT_CLIP)
    ratio = _with_tis(torch.exp(log_s), terms)
    unclipped, clipped = -terms.advantages * ratio, -terms.advantages * ratio.clamp(1 - low, 1 + high)
    trained = terms.mask * terms.seq_valid[inp.seq_ids].to(terms.mask.dtype)
    loss = torch.maximum(unclipped, clipped) * trained
    return _token_level_output(loss, terms, trained, {"actor/pg_clipfrac": clipped > unclipped})


@register_policy_loss("sapo", official_agg_mode="seq-mean-token-mean")
def sapo_loss(inp: PackedPolicyInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """SAPO: soft per-token gate f(r) = σ(τ(r − 1))·4/τ instead of a hard clip."""
    terms = compute_batch_terms(inp, cfg)
    adv = terms.advantages
    ratio = _with_tis(torch.exp(terms.log_ratio), terms)
    tau = torch.where(adv > 0, torch.full_like(adv, cfg.tau_pos), torch.full_like(adv, cfg.tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    trained = _trained(terms)
    return _token_level_output(-gate * adv * trained, terms, trained, {})


@register_policy_loss("cispo")
def cispo_loss(inp: PackedPolicyInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """CISPO: REINFORCE weighted by the clipped, detached token ratio."""
    terms = compute_batch_terms(inp, cfg)
    low, high = cfg.clip_range(DEFAULT_CLIP)
    ratio = torch.exp(terms.log_ratio.detach())
    clipped = ratio.clamp(1 - low, 1 + high)
    trained = _trained(terms)
    loss = _with_tis(-clipped * terms.advantages * terms.log_prob, terms) * trained
    return _token_level_output(loss, terms, trained, {"actor/pg_clipfrac": clipped != ratio})


def _with_tis(x: Tensor, terms: BatchTerms) -> Tensor:
    return x if terms.tis_weight is None else x * terms.tis_weight


def _trained(terms: BatchTerms) -> Tensor:
    """[N] 1.0 on tokens a token-level loss trains on: kept response tokens with finite log-probs."""
    return terms.mask * terms.usable.to(terms.mask.dtype)


def _active(terms: BatchTerms) -> Tensor:
    return (terms.seq_response_counts > 0) & terms.seq_valid & terms.seq_kept


def _sequence_metrics(terms: BatchTerms) -> dict[str, float]:
    return sequence_metrics(terms.seq_log_ratio, terms.seq_response_counts, terms.seq_valid, terms.seq_kept,
                            terms.seq_entropy)


def _token_level_output(
    token_loss: Tensor, terms: BatchTerms, trained: Tensor, flags: dict[str, Tensor]
) -> PolicyLossOutput:
    """Output with sequence metrics plus local token means of ``flags`` and of actor/ppo_kl = −lr."""
    weight = trained.detach()
    count = weight.sum().clamp(min=1)
    local = {name: (flag.to(weight.dtype) * weight).sum() / count for name, flag in flags.items()}
    local["actor/ppo_kl"] = (-terms.log_ratio.detach() * weight).sum() / count
    metrics = _sequence_metrics(terms)
    metrics.update(to_floats(local))
    return PolicyLossOutput(token_loss, terms.seq_token_counts, metrics)
