"""One CP rank's micro-batch as Megatron's forward and our loss consume it (label-aligned tensors).

The packer (:mod:`vespo_megatron.packing`) lays out every per-token array by the token itself. Megatron scores the
token at slot p from the logits at slot p, against the label = the NEXT token of the same sequence, which under
context parallelism may sit on another CP rank. ``micro_batch`` derives the label view from the packer's output of
ALL CP ranks (held together before the batch is distributed): label, loss mask and rollout log-prob of slot p are
those of token p+1 of its sequence. Routing rows stay by input token (row p = the router input of token p).

Shapes: t local slots, S sequences. tokens/position_ids/labels/seq_ids [t] int64; loss_mask/advantages [t] float;
rollout_log_prob [t] (0 where invalid) with rollout_valid [t] bool; old_log_prob / ref_log_prob [t] (set by
the old-log-prob and reference passes); seq_advantages [S]; cu_seqlens[_padded] [S+1] int32 (Transformer
Engine's dtype); routing [t/sp, L, K]. Every tensor lives on this rank's device (``device.local_device``: the
current CUDA device, or the CPU); routing stays a host array (the replay hands it to each router on the
router's device).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from vespo_megatron.megatron.device import to_local
from vespo_megatron.packing.batch import PackedBatch


@dataclass
class MicroBatch:
    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    seq_ids: torch.Tensor
    advantages: torch.Tensor
    seq_advantages: torch.Tensor
    cu_seqlens: torch.Tensor  # [S+1] (+1 tail-pad segment), as packed_seq_params hands them to attention
    cu_seqlens_padded: torch.Tensor
    max_seqlen: int
    cp: int = 1
    rollout_log_prob: Optional[torch.Tensor] = None
    rollout_valid: Optional[torch.Tensor] = None
    routing: Optional[np.ndarray] = None
    old_log_prob: Optional[torch.Tensor] = None
    ref_log_prob: Optional[torch.Tensor] = None  # [t] log π_ref of the labels (the reference pass, --kl-coef)
    # normalisers of the whole global batch (all micro-batches, all DP ranks): response tokens, sequences
    global_tokens: float = 0.0
    global_seqs: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_advantages.numel())

    def packed_seq_params(self) -> PackedSeqParams:
        """THD parameters (the micro-batch tail pad, if any, is already an extra all-padding segment)."""
        cu, cu_pad = self.cu_seqlens, self.cu_seqlens_padded
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=cu_pad,
            cu_seqlens_kv_padded=cu_pad,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )

    def with_old_log_prob(self, old_log_prob: torch.Tensor) -> "MicroBatch":
        return replace(self, old_log_prob=old_log_prob)


def _next_slot(batch: PackedBatch) -> np.ndarray:
    """[cp, t] flat index (into [cp·t]) of the slot holding the next token of the same sequence; −1 if none."""
    cp, t = batch.tokens.shape
    n_stream = int(batch.cu_seqlens[-1])
    real = batch.seq_index >= 0
    # stream index of each real slot: sequence start + position inside the sequence
    stream = np.where(real, batch.cu_seqlens[np.maximum(batch.seq_index, 0)] + batch.position_ids, -1)
    slot_of = np.full(n_stream + 1, -1, np.int64)
    slot_of[stream[real]] = np.flatnonzero(real.reshape(-1))
    ends = batch.cu_seqlens[1:][np.maximum(batch.seq_index, 0)]
    has_next = real & (stream + 1 < ends)
    return np.where(has_next, slot_of[np.where(has_next, stream + 1, n_stream)], -1)


def _tensor(array: np.ndarray, dtype: type) -> torch.Tensor:
    """A copy of ``array`` as ``dtype`` on this rank's device (one host-to-device copy on CUDA)."""
    return to_local(torch.from_numpy(np.array(array, dtype=dtype)))


def micro_batch(batch: PackedBatch, cp_rank: int = 0, sp_rank: int = 0) -> MicroBatch:
    """The label-aligned tensors of CP rank ``cp_rank`` (routing rows of SP rank ``sp_rank``)."""
    nxt = _next_slot(batch)[cp_rank]
    has = nxt >= 0
    src = np.where(has, nxt, 0)

    def label_view(arr: np.ndarray, fill) -> np.ndarray:
        return np.where(has, arr.reshape(-1)[src], fill)

    seq = batch.seq_index[cp_rank]
    adv_seq = batch.advantages if batch.advantages is not None else np.zeros(len(batch.prompt_lens))
    loss_mask = label_view(batch.loss_mask, 0.0).astype(np.float64)
    seq_ids = np.where(has, seq, 0)
    shard = batch.shard(cp_rank, sp_rank)
    rollout = valid = None
    if batch.rollout_logprobs is not None:
        rollout = _tensor(label_view(batch.rollout_logprobs, 0.0), np.float64)
        valid = _tensor(label_view(batch.rollout_logprob_valid, False), np.bool_)
    cu, cu_pad = batch.cu_seqlens, batch.cu_seqlens_padded
    total = batch.tokens.shape[1] * batch.cp
    if total > int(cu_pad[-1]):  # the micro-batch tail pad: an extra all-padding segment (host side, no sync)
        cu, cu_pad = np.append(cu, cu[-1]), np.append(cu_pad, total)
    return MicroBatch(
        tokens=_tensor(batch.tokens[cp_rank], np.int64),
        position_ids=_tensor(batch.position_ids[cp_rank], np.int64),
        labels=_tensor(label_view(batch.tokens, 0), np.int64),
        loss_mask=_tensor(loss_mask, np.float64),
        seq_ids=_tensor(seq_ids, np.int64),
        advantages=_tensor(np.where(loss_mask > 0, adv_seq[seq_ids], 0.0), np.float64),
        seq_advantages=_tensor(adv_seq, np.float64),
        cu_seqlens=_tensor(cu, np.int32),
        cu_seqlens_padded=_tensor(cu_pad, np.int32),
        max_seqlen=batch.max_seqlen,
        cp=batch.cp,
        rollout_log_prob=rollout,
        rollout_valid=valid,
        routing=shard.routing,
    )
