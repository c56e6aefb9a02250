"""The packer's output: one micro-batch in Megatron's packed layout, per CP rank, with per-(cp, sp) views.

Shapes: S sequences, cp CP ranks, t = ``local_tokens`` slots per CP rank, sp SP ranks (t divisible by sp).
Every per-token array is indexed by the token itself (see ``layout``): slot p of sequence i holds token p, its
rollout log-prob log μ(token p | tokens < p), its loss-mask bit and the routing row of the forward whose input is
token p. The Megatron side shifts labels (logits at p − 1 score token p).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class PackStats:
    """What the packer decided, summed over the micro-batch (identical for the C++ and numpy implementations)."""

    samples: int
    tokens: int  # Σ n_i real tokens
    response_tokens: int  # Σ R_i
    padded_tokens: int  # Σ P_i (after the per-sequence pad to 2·cp)
    tail_pad_tokens: int  # cp·t − Σ P_i
    logprobs_missing: int  # response tokens without a rollout log-prob (valid = 0)
    logprobs_truncated: int  # rollout log-probs beyond the response, dropped (truncate=True only)
    samples_missing: int  # samples with at least one missing log-prob
    samples_truncated: int  # samples with dropped log-probs
    routing_filler_rows: int  # real tokens given a filler routing row (the last token of each sample)


@dataclass(frozen=True)
class RankShard:
    """What one (cp rank, sp rank) feeds to Megatron; zero-copy views of ``PackedBatch`` (torch.from_numpy)."""

    tokens: np.ndarray  # [t] int64, the whole local pack (SP does not split token ids)
    position_ids: np.ndarray  # [t] int64
    loss_mask: np.ndarray  # [t] float32
    seq_index: np.ndarray  # [t] int64, −1 on pad
    rollout_logprobs: np.ndarray | None  # [t] float32, 0 where invalid
    rollout_logprob_valid: np.ndarray | None  # [t] bool
    routing: np.ndarray | None  # [t/sp, layers, topk], this SP rank's slice
    cu_seqlens: np.ndarray  # [S+1] int32
    cu_seqlens_padded: np.ndarray  # [S+1] int32
    max_seqlen: int
    sp_slice: slice  # this SP rank's slots in the local pack


@dataclass(frozen=True)
class PackedBatch:
    """One packed micro-batch; per-token arrays are [cp, t] (row r = CP rank r's local pack)."""

    cp: int
    sp: int
    tail_align: int
    sample_ids: np.ndarray  # [S] int64, sample of each sequence
    prompt_lens: np.ndarray  # [S] int64
    response_lens: np.ndarray  # [S] int64
    cu_seqlens: np.ndarray  # [S+1] int32
    cu_seqlens_padded: np.ndarray  # [S+1] int32
    tokens: np.ndarray  # [cp, t] int64, 0 on pad
    position_ids: np.ndarray  # [cp, t] int64
    seq_index: np.ndarray  # [cp, t] int64, −1 on pad
    loss_mask: np.ndarray  # [cp, t] float32, 1 on (masked-in) response tokens
    rollout_logprobs: np.ndarray | None  # [cp, t] float32, 0 where invalid
    rollout_logprob_valid: np.ndarray | None  # [cp, t] bool
    routing: np.ndarray | None  # [cp, t, layers, topk], filler rows 0..topk−1 on pad and last tokens
    advantages: np.ndarray | None  # [S] float64
    rewards: np.ndarray | None  # [S] float64
    stats: PackStats

    @property
    def seq_lens(self) -> np.ndarray:
        """[S] int64 real tokens per sequence."""
        return self.prompt_lens + self.response_lens

    @property
    def local_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def max_seqlen(self) -> int:
        return int(np.diff(self.cu_seqlens_padded).max(initial=0))

    def sp_slice(self, sp_rank: int) -> slice:
        """Slots [s·t/sp, (s+1)·t/sp) of the local pack owned by SP rank s."""
        step = self.local_tokens // self.sp
        return slice(sp_rank * step, (sp_rank + 1) * step)

    def shard(self, cp_rank: int, sp_rank: int = 0) -> RankShard:
        """Views for one (cp rank, sp rank)."""
        if not (0 <= cp_rank < self.cp and 0 <= sp_rank < self.sp):
            raise ValueError(f"rank (cp {cp_rank}, sp {sp_rank}) outside cp={self.cp}, sp={self.sp}")
        sl = self.sp_slice(sp_rank)
        return RankShard(
            tokens=self.tokens[cp_rank],
            position_ids=self.position_ids[cp_rank],
            loss_mask=self.loss_mask[cp_rank],
            seq_index=self.seq_index[cp_rank],
            rollout_logprobs=None if self.rollout_logprobs is None else self.rollout_logprobs[cp_rank],
            rollout_logprob_valid=None if self.rollout_logprob_valid is None else self.rollout_logprob_valid[cp_rank],
            routing=None if self.routing is None else self.routing[cp_rank, sl],
            cu_seqlens=self.cu_seqlens,
            cu_seqlens_padded=self.cu_seqlens_padded,
            max_seqlen=self.max_seqlen,
            sp_slice=sl,
        )


def check_unpack_values(batch: PackedBatch, values: np.ndarray) -> None:
    """``values`` must be C-contiguous [cp, t, ...] (stack the CP ranks; concatenate SP slices if they were split)."""
    if not isinstance(values, np.ndarray) or values.shape[:2] != batch.tokens.shape:
        shape = getattr(values, "shape", type(values).__name__)
        raise ValueError(f"values: expected shape ({batch.cp}, {batch.local_tokens}, ...), got {shape}")
    if not values.flags.c_contiguous:
        raise ValueError("values: array is not C-contiguous")


def split_by_sequence(flat: np.ndarray, cu_seqlens: np.ndarray) -> list[np.ndarray]:
    """[Σ n_i, ...] token stream -> per-sequence views [n_i, ...] (response part: ``a[prompt_len:]``)."""
    return [flat[a:b] for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]


def restore_order(batches: Sequence[PackedBatch], per_batch: Sequence[list[np.ndarray]], num_samples: int) -> list:
    """Per-batch per-sequence outputs (``unpack`` results) -> one list indexed by sample id (0..num_samples−1)."""
    out: list = [None] * num_samples
    for batch, arrays in zip(batches, per_batch, strict=True):
        for sid, arr in zip(batch.sample_ids.tolist(), arrays, strict=True):
            if not 0 <= sid < num_samples or out[sid] is not None:
                raise ValueError(f"sample {sid}: id out of range or packed twice")
            out[sid] = arr
    missing = [i for i, a in enumerate(out) if a is None]
    if missing:
        raise ValueError(f"sample {missing[0]}: not in any micro-batch")
    return out
