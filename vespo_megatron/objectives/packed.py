"""The packed input every policy loss takes, and the one way per-sequence sums are formed.

Layout: 1-D tensors over the tokens of a (micro-)batch [num_tokens], each token tagged with its sequence in
``seq_ids`` (int64 in [0, num_seqs)). Under context parallelism a rank holds only some tokens of each sequence; every
per-sequence quantity is then a local segment sum passed through ``seq_sum``, which must return the sum over all
ranks of a [k, num_seqs] tensor (an all-reduce over the CP group; identity on one rank). ``reduce_over_sequences``
is the only caller of ``seq_sum``; it wraps it so that gradients also flow through it (backward = ``seq_sum`` of the
incoming gradient), so a plain, non-differentiable all-reduce is enough.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

SeqSum = Callable[[Tensor], Tensor]
LOG_PROB_TOLERANCE = 1e-4  # log-probs may exceed 0 by this much (rounding) before they are rejected


def identity_seq_sum(local: Tensor) -> Tensor:
    """The single-rank ``seq_sum``: the local sums are already the full sums."""
    return local


@dataclass(frozen=True)
class PackedPolicyInput:
    """Inputs of a policy loss on the packed layout; shapes are checked on construction (ValueError naming the field).

    log_prob [N]: log π_θ of the sampled tokens (carries the gradient). old_log_prob [N]: log π_old.
    advantages [N]: per-token advantage (only response tokens are read). response_mask [N]: 1 on response tokens, 0
    elsewhere (bool or 0/1). seq_ids [N]: int64 sequence index in [0, num_seqs). seq_advantages [num_seqs]: the sign
    source of VESPO's asymmetric kernel. rollout_log_prob [N]: log μ of the rollout engine (TIS/MIS only).
    entropy [N]: token entropy, logged (non-finite values count as 0), and the entropy bonus's term (with its
    gradient) when the assembly's entropy_coef != 0. ref_log_prob [N]: log π_ref of the sampled tokens (the KL
    term's reference; no gradient). seq_sum: see the module docstring.
    Non-finite log-probs are allowed: they give weight 0 (see ``batch_terms``).
    """

    log_prob: Tensor
    old_log_prob: Tensor
    advantages: Tensor
    response_mask: Tensor
    seq_ids: Tensor
    seq_advantages: Tensor
    num_seqs: int
    rollout_log_prob: Tensor | None = None
    entropy: Tensor | None = None
    seq_sum: SeqSum = identity_seq_sum
    ref_log_prob: Tensor | None = None

    def __post_init__(self) -> None:
        _require_tensor("log_prob", self.log_prob, floating=True)
        if self.log_prob.dim() != 1:
            raise ValueError(f"log_prob: expected a 1-D [num_tokens] tensor, got shape {tuple(self.log_prob.shape)}")
        if self.log_prob.numel() == 0:
            raise ValueError("log_prob: empty batch (0 tokens)")
        shape = tuple(self.log_prob.shape)
        optional = ("rollout_log_prob", "entropy", "ref_log_prob")
        for name in ("old_log_prob", "advantages", "response_mask", "seq_ids", *optional):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            _require_tensor(name, value, floating=name not in ("response_mask", "seq_ids"))
            if tuple(value.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} differs from log_prob's {shape}")
        if isinstance(self.num_seqs, bool) or not isinstance(self.num_seqs, int) or self.num_seqs < 1:
            raise ValueError(f"num_seqs: must be an int >= 1, got {self.num_seqs!r}")
        if self.seq_ids.dtype != torch.int64:
            raise ValueError(f"seq_ids: dtype must be torch.int64, got {self.seq_ids.dtype}")
        if bool(((self.seq_ids < 0) | (self.seq_ids >= self.num_seqs)).any()):
            raise ValueError(f"seq_ids: values must lie in [0, num_seqs={self.num_seqs})")
        _require_tensor("seq_advantages", self.seq_advantages, floating=True)
        if tuple(self.seq_advantages.shape) != (self.num_seqs,):
            raise ValueError(f"seq_advantages: shape {tuple(self.seq_advantages.shape)}, expected ({self.num_seqs},)")
        if not bool(torch.isfinite(self.seq_advantages).all()):
            raise ValueError("seq_advantages: non-finite value")
        if not bool(((self.response_mask == 0) | (self.response_mask == 1)).all()):
            raise ValueError("response_mask: values must be 0 or 1")
        on_response = self.response_mask.bool()
        if not bool(torch.isfinite(self.advantages[on_response]).all()):
            raise ValueError("advantages: non-finite value on a response token")
        for name in ("log_prob", "old_log_prob", "rollout_log_prob", "ref_log_prob"):  # ±inf / NaN are allowed (weight 0)
            value = getattr(self, name)
            response_values = None if value is None else value.detach()[on_response]
            if response_values is not None and bool(
                ((response_values > LOG_PROB_TOLERANCE) & torch.isfinite(response_values)).any()
            ):
                raise ValueError(f"{name}: log-probability above 0 (by more than {LOG_PROB_TOLERANCE:g})")
        if not callable(self.seq_sum):
            raise ValueError("seq_sum: must be callable")


def _require_tensor(name: str, value: Any, floating: bool) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {value.dtype}")


def segment_sum(values: Tensor, seq_ids: Tensor, num_seqs: int) -> Tensor:
    """Local per-sequence sums [k, num_seqs] of rows ``values`` [k, N] grouped by ``seq_ids`` [N]."""
    return values.new_zeros(values.shape[0], num_seqs).index_add(1, seq_ids, values)


class _SeqSumFunction(torch.autograd.Function):
    """Autograd-transparent ``seq_sum``: forward sums the local [k, num_seqs] over ranks, backward sums the grads."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, seq_sum: SeqSum) -> Tensor:  # type: ignore[override]
        ctx.seq_sum = seq_sum
        total = seq_sum(local)
        return total.clone() if total is local else total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.seq_sum(grad.contiguous()), None


def reduce_over_sequences(inp: PackedPolicyInput, rows: list[Tensor]) -> Tensor:
    """Full per-sequence sums [len(rows), num_seqs] of the token rows [N] in ONE ``seq_sum`` call.

    If some row carries a gradient, ``seq_sum`` is called once more in the backward pass (on the gradient).
    """
    local = segment_sum(torch.stack(rows), inp.seq_ids, inp.num_seqs)
    total = _SeqSumFunction.apply(local, inp.seq_sum) if local.requires_grad else inp.seq_sum(local)
    if not isinstance(total, Tensor) or total.shape != local.shape:
        got = tuple(total.shape) if isinstance(total, Tensor) else type(total).__name__
        raise ValueError(f"seq_sum: returned {got}, expected a tensor of shape {tuple(local.shape)}")
    return total
