"""The VESPO kernel φ(W) = W^c1 · exp(c2·(1 − W)), evaluated in log space on per-sequence vectors [num_seqs].

As in the official code (FloyedShen/VESPO, ``compute_policy_loss_vespo``):

- ``logW_i = clamp(S_i / g(T_i), −20, 20)`` where S_i = Σ_t m_t·clamp(lr_t, ±20) [+ TIS term] is the summed log-ratio
  of sequence i, T_i its response-token count and g = 1 (``vespo``, the true product), g = T (``vespo-lin``, the
  geometric mean) or g = √T (``vespo-sqrt``); the two ablations are not in the official code.
- ``W = exp(logW)`` (detached); ``logφ = c2' + c1·log(max(W, 1e-8)) − c2'·W`` with ``c2' = max(c2, 1e-4)``, so that
  φ(1) = 1; ``φ = exp(logφ)`` detached, with NaN/±inf mapped to 0.
- (c1, c2) depend on the sign of the sequence advantage: A ≥ 0 (zero included) uses (c1_pos, c2_pos) = (2, 3),
  A < 0 uses (c1_neg, c2_neg) = (3, 2). The official config calls c1 ``k`` and c2 ``lambda``.

φ peaks at W = c1/c2 with value (c1/c2)^c1 · e^(c2 − c1).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LOG_W_CLAMP = 20.0  # bound on per-token log-ratios and on logW
W_FLOOR = 1e-8  # floor of W inside the power term
C2_FLOOR = 1e-4  # floor of c2 (the official ``lambda``)

LogWTransform = Literal["product", "lin", "sqrt"]
LOG_W_TRANSFORMS: tuple[str, ...] = ("product", "lin", "sqrt")


def sequence_log_w(seq_log_ratio: Tensor, token_counts: Tensor, transform: LogWTransform = "product") -> Tensor:
    """logW [num_seqs] = clamp(S / g(T), ±20), g(T) = 1, T or √T for transform product, lin, sqrt (T floored at 1).

    ``seq_log_ratio`` S [num_seqs] is the (global) Σ_t m_t·lr_t, ``token_counts`` T [num_seqs] the response tokens.
    """
    if transform == "product":
        scaled = seq_log_ratio
    elif transform == "lin":
        scaled = seq_log_ratio / token_counts.clamp(min=1)
    elif transform == "sqrt":
        scaled = seq_log_ratio / token_counts.clamp(min=1).sqrt()
    else:
        raise ValueError(f"transform: unknown log-W transform {transform!r}; known: {', '.join(LOG_W_TRANSFORMS)}")
    return scaled.clamp(-LOG_W_CLAMP, LOG_W_CLAMP)


def log_phi(w: Tensor, c1: Tensor | float, c2: Tensor | float) -> Tensor:
    """logφ(W) = c2' + c1·log(max(W, 1e-8)) − c2'·W with c2' = max(c2, 1e-4); broadcasts over [num_seqs]."""
    c2_safe = torch.clamp(torch.as_tensor(c2, dtype=w.dtype, device=w.device), min=C2_FLOOR)
    return c2_safe + c1 * torch.log(torch.clamp(w, min=W_FLOOR)) - c2_safe * w


def phi(log_w: Tensor, c1: Tensor | float, c2: Tensor | float) -> tuple[Tensor, Tensor]:
    """(W, φ) [num_seqs] from logW, both detached; φ = exp(logφ(W)) with NaN/±inf → 0."""
    w = torch.exp(log_w.detach())
    weight = torch.exp(log_phi(w, c1, c2))
    return w, torch.nan_to_num(weight, nan=0.0, posinf=0.0, neginf=0.0)


def sign_parameters(
    seq_advantages: Tensor, c1_pos: float, c2_pos: float, c1_neg: float, c2_neg: float
) -> tuple[Tensor, Tensor]:
    """Per-sequence (c1, c2) [num_seqs]: (c1_pos, c2_pos) where A ≥ 0, (c1_neg, c2_neg) where A < 0."""
    positive = seq_advantages >= 0
    dtype = seq_advantages.dtype if seq_advantages.is_floating_point() else torch.float64

    def pick(pos: float, neg: float) -> Tensor:
        as_tensor = lambda value: torch.tensor(value, dtype=dtype, device=seq_advantages.device)  # noqa: E731
        return torch.where(positive, as_tensor(pos), as_tensor(neg))

    return pick(c1_pos, c1_neg), pick(c2_pos, c2_neg)
