"""Loss aggregation modes: per-token loss [N] -> scalar, with the micro-batch's or an explicit global normaliser.

With per-token losses L_t (0 on untrained tokens), T_i the (global, kept) response-token count of sequence i and
n = #{i : T_i > 0}:

- token-mean:               Σ_t L_t / D,                   D = global_num_tokens or Σ_i T_i
- seq-mean-token-sum:       Σ_t L_t / D,                   D = global_num_seqs or n
- seq-mean-token-mean:      Σ_t L_t / (T_i(t) + 1e-8) / D,  D = global_num_seqs or n
- seq-mean-token-sum-norm:  Σ_t L_t / loss_scale_factor    (the fork's default: the padded response length)

Without a global normaliser D is the micro-batch's own (the official per-micro-batch behaviour). With the whole
global batch's token / sequence count, the sum of the values of all micro-batches (and all CP / DP ranks) is exactly
the global value. T_i must be global over context-parallel ranks (``PolicyLossOutput.seq_token_counts`` is); the
returned value is then this rank's share, and the shares of the CP ranks add up to the micro-batch value.
"""
from __future__ import annotations

import math

from torch import Tensor

AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
SEQ_MEAN_EPS = 1e-8


def check_agg_mode(loss_agg_mode: str) -> None:
    """ValueError naming loss_agg_mode unless it is one of AGG_MODES."""
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode: unknown mode {loss_agg_mode!r}; known: {', '.join(AGG_MODES)}")


def aggregate_loss(
    token_loss: Tensor,
    seq_ids: Tensor,
    seq_token_counts: Tensor,
    loss_agg_mode: str = "token-mean",
    *,
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """Scalar loss from token_loss [N], seq_ids [N] and global seq_token_counts [num_seqs]; see the module doc."""
    check_agg_mode(loss_agg_mode)
    for name, value in (("global_num_tokens", global_num_tokens), ("global_num_seqs", global_num_seqs),
                        ("loss_scale_factor", loss_scale_factor)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
    counts = seq_token_counts.to(token_loss.dtype)
    if loss_agg_mode == "token-mean":
        return token_loss.sum() / (global_num_tokens or counts.sum().clamp(min=1))
    if loss_agg_mode == "seq-mean-token-sum-norm":
        if loss_scale_factor is None:
            raise ValueError("loss_scale_factor: required for seq-mean-token-sum-norm on the packed layout")
        return token_loss.sum() / loss_scale_factor
    num_seqs = global_num_seqs or (counts > 0).sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-sum":
        return token_loss.sum() / num_seqs
    return (token_loss / (counts[seq_ids] + SEQ_MEAN_EPS)).sum() / num_seqs
