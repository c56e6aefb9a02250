"""Megatron packed-sequence layout as index maps (THD, per-sequence pad to 2·cp, CP zig-zag, tail pad, SP slices).

Conventions (shared by the numpy reference, the C++ packer and the routing-trace sharding):

* S sequences of n_i real tokens. The *token stream* is their concatenation, [Σ n_i]; sequence i starts at
  ``cu_seqlens[i]``.
* Each sequence is padded to P_i = ceil(n_i / 2cp)·2cp tokens; ``cu_seqlens_padded`` are the offsets of the padded
  sequences (global, identical on every CP rank, as Megatron's ``PackedSeqParams`` wants them).
* Context parallel: padded sequence i is cut into 2·cp chunks of c_i = P_i / 2cp tokens; CP rank r keeps chunks r and
  2cp−1−r, in that order. The local pack of rank r is the concatenation over sequences, Σ P_i / cp tokens.
* Micro-batch tail pad: the local pack is padded at its end to ``local_tokens`` t, a multiple of lcm(sp, tail_align).
  t is the same on every CP rank.
* Sequence parallel: SP rank s owns the contiguous slice ``[sp_bounds[s], sp_bounds[s+1])`` = [s·t/sp, (s+1)·t/sp)
  of its CP rank's local pack. Token ids are not split by SP (every TP rank embeds the whole local pack); per-token
  data consumed after the embedding (routing rows) is.

Per local slot the layout stores ``position`` (offset of the slot inside its padded sequence, so CP chunks keep
their global positions; 0 on the tail pad) and ``seq_index`` (sequence of a real token; −1 on every pad slot).
Every array here is indexed by the token itself (slot p holds data about token p of its sequence).

Index maps: ``source_index`` maps local slots to a stream of per-sequence segments (tokens, rollout log-probs that
start at the first response token, routing rows that stop one short of the last token, ...), −1 where the segment
has no value. ``take`` applies such a map with a fill value; ``scatter`` is its inverse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class PackLayout:
    """Index maps of one micro-batch. Shapes: S sequences, cp ranks, t = ``local_tokens`` slots per CP rank."""

    cp: int
    sp: int
    seq_lens: np.ndarray  # [S] int64, n_i
    padded_lens: np.ndarray  # [S] int64, P_i
    cu_seqlens: np.ndarray  # [S+1] int32, offsets of the real sequences
    cu_seqlens_padded: np.ndarray  # [S+1] int32, offsets of the padded sequences
    position: np.ndarray  # [cp, t] int64, offset inside the padded sequence; 0 on the tail pad
    seq_index: np.ndarray  # [cp, t] int64, sequence of a real token; −1 on pad
    gather: np.ndarray  # [cp, t] int64, index into the token stream [Σ n_i]; −1 on pad
    sp_bounds: np.ndarray  # [sp+1] int64, SP slice bounds of the local pack

    @property
    def local_tokens(self) -> int:
        """t: slots per CP rank (after the tail pad)."""
        return int(self.position.shape[1])

    @property
    def max_seqlen(self) -> int:
        """max_i P_i (0 for an empty micro-batch): the ``max_seqlen`` Megatron's THD attention wants."""
        return int(self.padded_lens.max(initial=0))


def local_token_count(padded_total: int, cp: int, sp: int, tail_align: int) -> int:
    """t = Σ P_i / cp rounded up to a multiple of lcm(sp, tail_align)."""
    align = math.lcm(sp, tail_align)
    return -(-(padded_total // cp) // align) * align


def check_parallel(cp: int, sp: int, tail_align: int) -> None:
    """ValueError unless cp, sp and tail_align are positive integers."""
    for name, value in (("cp", cp), ("sp", sp), ("tail_align", tail_align)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def build_layout(seq_lens: np.ndarray, cp: int = 1, sp: int = 1, tail_align: int = 1) -> PackLayout:
    """Index maps for sequences of ``seq_lens`` [S] real tokens packed for (cp, sp).

    ``tail_align`` adds an alignment of the local pack on top of sp (e.g. 8 or 128 for fp8 kernels).
    """
    check_parallel(cp, sp, tail_align)
    n = np.asarray(seq_lens)
    if n.ndim != 1 or not np.issubdtype(n.dtype, np.integer):
        raise ValueError(f"seq_lens must be a 1-D integer array, got shape {n.shape} dtype {n.dtype}")
    n = n.astype(np.int64)
    if n.size and n.min() < 0:
        i = int(np.argmax(n < 0))
        raise ValueError(f"sequence {i}: length {int(n[i])} < 0")
    two_cp = 2 * cp
    padded = -(-n // two_cp) * two_cp
    cu = np.zeros(n.size + 1, np.int64)
    np.cumsum(n, out=cu[1:])
    cu_padded = np.zeros(n.size + 1, np.int64)
    np.cumsum(padded, out=cu_padded[1:])
    if cu_padded[-1] > INT32_MAX:
        raise ValueError(f"micro-batch of {int(cu_padded[-1])} padded tokens overflows int32 cu_seqlens")
    t = local_token_count(int(cu_padded[-1]), cp, sp, tail_align)

    chunk = padded // two_cp  # c_i
    owner = np.repeat(np.arange(n.size), 2 * chunk)  # sequence of each local slot before the tail pad
    j = np.arange(owner.size) - (cu_padded[:-1] // cp)[owner]  # slot offset inside the local sequence
    c = chunk[owner]
    ranks = np.arange(cp)[:, None]
    body = np.where(j < c, ranks * c + j, (two_cp - 1 - ranks) * c + (j - c))  # [cp, Σ P_i / cp]

    position = np.zeros((cp, t), np.int64)
    position[:, : owner.size] = body
    seq_index = np.full((cp, t), -1, np.int64)
    real = body < n[owner]
    seq_index[:, : owner.size] = np.where(real, owner, -1)
    gather = np.full((cp, t), -1, np.int64)
    gather[:, : owner.size] = np.where(real, cu[:-1][owner] + body, -1)
    return PackLayout(
        cp=cp,
        sp=sp,
        seq_lens=n,
        padded_lens=padded,
        cu_seqlens=cu.astype(np.int32),
        cu_seqlens_padded=cu_padded.astype(np.int32),
        position=position,
        seq_index=seq_index,
        gather=gather,
        sp_bounds=np.arange(sp + 1, dtype=np.int64) * (t // sp),
    )


def source_index(layout: PackLayout, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Map local slots to a stream of per-sequence segments: [cp, t] int64, −1 where there is no value.

    Segment i covers positions [starts[i], starts[i] + lengths[i]) of sequence i and sits at offset
    Σ_{j<i} lengths[j] of the stream. Examples: tokens (starts 0, lengths n_i) give ``layout.gather``; rollout
    log-probs (starts = prompt lengths, lengths = log-probs kept); routing rows (starts 0, lengths n_i − 1).
    """
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    n = layout.seq_lens
    if starts.shape != n.shape or lengths.shape != n.shape:
        raise ValueError(f"starts {starts.shape} and lengths {lengths.shape} must both have shape {n.shape}")
    bad = (starts < 0) | (lengths < 0) | (starts + lengths > n)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"sequence {i}: segment [{starts[i]}, {starts[i] + lengths[i]}) outside [0, {n[i]}]")
    offsets = np.zeros(n.size + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    seq = np.maximum(layout.seq_index, 0)
    k = layout.position - starts[seq]
    inside = (layout.seq_index >= 0) & (k >= 0) & (k < lengths[seq])
    return np.where(inside, offsets[:-1][seq] + k, -1)


def take(stream: np.ndarray, index: np.ndarray, fill: np.ndarray | int | float) -> np.ndarray:
    """out[r, p] = stream[index[r, p]] where index ≥ 0, else ``fill`` (broadcast to a row of ``stream``).

    stream [N, ...], index [cp, t] -> [cp, t, ...] with the dtype of ``stream``.
    """
    missing = index < 0
    if stream.shape[0] == 0:
        out = np.empty(index.shape + stream.shape[1:], stream.dtype)
    else:
        out = stream[np.where(missing, 0, index)]
    out[missing] = fill
    return out


def scatter(values: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    """Inverse of ``take``: out[index[r, p]] = values[r, p] for index ≥ 0; values [cp, t, ...] -> [size, ...].

    With ``layout.gather`` every real token is written exactly once (zeros elsewhere only if the map misses some).
    """
    out = np.zeros((size,) + values.shape[2:], values.dtype)
    hit = index >= 0
    out[index[hit]] = values[hit]
    return out
