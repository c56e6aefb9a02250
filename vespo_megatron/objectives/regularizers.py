"""Per-token regularisers of the policy loss: the KL penalty against a frozen reference and the entropy bonus.

With δ_t = log π_ref(y_t) − log π(y_t) (log-probs [num_tokens] of the sampled tokens):

- ``k1``:                 kl_t = −δ_t = log π − log π_ref
- ``k2`` (``mse``):       kl_t = ½ δ_t²
- ``k3`` (``low_var_kl``): kl_t = exp(δ_t) − δ_t − 1, with δ clamped to [−20, 20] and kl_t to [−10, 10] (verl's
  low-variance estimator; ≥ 0, unbiased for KL(π‖π_ref) under sampling from π)

The loss assembly adds ``regularizer_per_token`` = kl_coef · kl_t − entropy_coef · H_t [num_tokens] to the policy
loss, aggregated with the SAME aggregation (token-mean over the global batch, ...) as the policy term.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

KL_LOSS_TYPES = ("k1", "k2", "mse", "k3", "low_var_kl")
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
