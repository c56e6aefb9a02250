"""Per-token regularisers of the policy loss: the KL penalty against a frozen reference and the entropy bonus.

With δ_t = log π_ref(y_t) − log π(y_t) (log-probs [num_tokens] of the sampled tokens):

- ``k1``:                 kl_t = −δ_t = log π − log π_ref
- ``k2`` (``mse``):       kl_t = ½ δ_t²
- ``k3`` (``low_var_kl``): kl_t = exp(δ_t) − δ_t − 1, with δ clamped to [−20, 20] and kl_t to [−10, 10] (verl's
  low-variance estimator; ≥ 0, unbiased for KL(π‖π_ref) under sampling from π)

The loss assembly (``policy_loss.assemble_policy_loss``) adds ``regularizer_per_token`` = kl_coef · kl_t −
entropy_coef · H_t [num_tokens] to the policy's per-token loss on the trained tokens (response tokens of the
sequences the policy loss keeps, with finite log-probs; ``regularizer_terms``), so that both are aggregated by the
SAME aggregation and normaliser (token-mean over the global batch, ...). The entropy carries its gradient (through
the logits) when entropy_coef != 0.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vespo_megatron.objectives.config import KL_LOSS_TYPES, RegularizerConfig
from vespo_megatron.objectives.packed import PackedPolicyInput

DELTA_CLAMP = 20.0
K3_CLAMP = 10.0


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate [num_tokens] of π against π_ref (``--kl-loss-type``); differentiable in ``log_prob``.

    Args:
        log_prob: log π(y_t) [num_tokens].
        ref_log_prob: log π_ref(y_t) [num_tokens] (no gradient is taken through it).
        kind: one of KL_LOSS_TYPES.
    """
    if kind not in KL_LOSS_TYPES:
        raise ValueError(f"--kl-loss-type: unknown type {kind!r}; known: {', '.join(KL_LOSS_TYPES)}")
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(f"ref_log_prob: shape {tuple(ref_log_prob.shape)} != log_prob {tuple(log_prob.shape)}")
    delta = ref_log_prob.detach() - log_prob
    if kind == "k1":
        return -delta
    if kind in ("k2", "mse"):
        return 0.5 * delta.square()
    delta = delta.clamp(-DELTA_CLAMP, DELTA_CLAMP)
    return (delta.exp() - delta - 1).clamp(-K3_CLAMP, K3_CLAMP)


def regularizer_per_token(log_prob: Tensor, entropy: Optional[Tensor] = None, ref_log_prob: Optional[Tensor] = None,
                          *, kl_coef: float = 0.0, kl_loss_type: str = "low_var_kl",
                          entropy_coef: float = 0.0) -> Tensor:
    """kl_coef · kl_t − entropy_coef · H_t [num_tokens] (a term with coefficient 0 is left out).

    Args:
        log_prob: log π(y_t) [num_tokens].
        entropy: H_t of π at each position [num_tokens] (needed when entropy_coef != 0).
        ref_log_prob: log π_ref(y_t) [num_tokens] (needed when kl_coef != 0).
    """
    term = torch.zeros_like(log_prob)
    if kl_coef:
        if ref_log_prob is None:
            raise ValueError("--kl-coef: needs the reference log-probs (--ref-load)")
        term = term + kl_coef * kl_penalty(log_prob, ref_log_prob, kl_loss_type)
    if entropy_coef:
        if entropy is None:
            raise ValueError("--entropy-coef: needs the per-token entropy")
        term = term - entropy_coef * entropy
    return term


def regularizer_terms(inp: PackedPolicyInput, trained: Tensor,
                      reg: RegularizerConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The regulariser of ``inp`` on the ``trained`` tokens, for the loss assembly.

    Args:
        inp: the packed input; ``inp.ref_log_prob`` [N] is needed when reg.kl_coef != 0, ``inp.entropy`` [N] when
            reg.entropy_coef != 0 (with its gradient).
        trained: [N] bool, the tokens the policy loss trains (response tokens of kept sequences).
        reg: the coefficients.

    Returns:
        (term [N]: kl_coef · kl_t − entropy_coef · H_t, 0 off ``trained`` and where an input is not finite;
        parts: {"kl_loss": kl_t, "entropy_loss": H_t} [N] detached, 0 elsewhere, for the terms that are on).
    """
    if reg.kl_coef and inp.ref_log_prob is None:
        raise ValueError("ref_log_prob: --kl-coef needs the reference log-probs (the reference pass)")
    if reg.entropy_coef and inp.entropy is None:
        raise ValueError("entropy: --entropy-coef needs the per-token entropy")
    dtype = torch.promote_types(inp.log_prob.dtype, torch.float32)
    used = {"log_prob": inp.log_prob.to(dtype)}
    if reg.kl_coef:
        used["ref_log_prob"] = inp.ref_log_prob.detach().to(dtype)
    if reg.entropy_coef:
        used["entropy"] = inp.entropy.to(dtype)
    usable = trained.bool()
    for value in used.values():
        usable = usable & torch.isfinite(value.detach())
    zero = used["log_prob"].new_zeros(())
    safe = {name: torch.where(usable, value, zero) for name, value in used.items()}  # no NaN reaches autograd
    term = regularizer_per_token(safe["log_prob"], safe.get("entropy"), safe.get("ref_log_prob"),
                                 kl_coef=reg.kl_coef, kl_loss_type=reg.kl_loss_type, entropy_coef=reg.entropy_coef)
    parts = {}
    if reg.kl_coef:
        kl = kl_penalty(safe["log_prob"].detach(), safe["ref_log_prob"], reg.kl_loss_type)
        parts["kl_loss"] = torch.where(usable, kl, zero)
    if reg.entropy_coef:
        parts["entropy_loss"] = safe["entropy"].detach()
    return torch.where(usable, term, zero), parts
