"""Each rank receives only its own share of a step's batch: no pickled broadcast of the whole batch.

Rank 0 (the rollout client) plans the step as before — N mini-batches, each split over the data-parallel ranks by
``plan_micro_batches`` — and sends every other rank one flat byte buffer (point to point, over a gloo group) holding
only what that rank trains on: its samples' token ids (int32), rollout log-probs (float32) and advantages (float64),
and, with
routing replay r3, the rows of ITS CP/SP slice of the packed micro-batch and the columns of ITS pipeline stage's MoE
layers (the trace storage dtype). The receiver packs its micro-batches itself (the packer is deterministic) and gets
the trace rows' slot index from the same layout (``routing.shard.local_index``). Under context parallelism every CP
rank of a data-parallel rank receives that rank's samples whole (labels cross the CP chunk boundaries) and only its
own CP/SP slice of the routing trace.

Buffer layout (little-endian): int64 [n_int32, n_float64, n_tokens, n_logprobs, n_routing_bytes, routing itemsize]
then int32 counts [n_minis; per mini n_micro; per micro n_samples, routing rows; per sample prompt_len, response_len],
float64 [per mini global_tokens, global_seqs], int32 tokens, float32 log-probs, float64 advantages, routing bytes.
Rank r's *share* (:func:`share_bytes`) is its samples' arrays and lengths plus its routing slice; the buffer adds the
counts and the two normalisers per mini-batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from vespo_megatron.megatron.batch import MicroBatch, micro_batch
from vespo_megatron.packing import pack, plan_micro_batches
from vespo_megatron.packing.sample import Sample
from vespo_megatron.routing.shard import LocalTrace, batch_shard, local_index
from vespo_megatron.routing.trace import PackedTrace

_HEADER = 6


@dataclass(frozen=True)
class RankPlace:
    """Where a rank sits: its data-parallel, tensor(sequence)-parallel and context-parallel rank and its stage's trace
    columns."""

    dp_rank: int
    tp_rank: int
    layer_columns: tuple[int, ...]
    cp_rank: int = 0


@dataclass
class MicroShare:
    """One micro-batch of a rank: its samples (in order) and, with r3, its routing slice [T, L_local, k]."""

    samples: list[Sample]
    routing: Optional[np.ndarray] = None


@dataclass
class MiniShare:
    micros: list[MicroShare]
    global_tokens: float
    global_seqs: float


def plan_shares(samples: Sequence[Sample], trace: Optional[PackedTrace], num_mini_batches: int, dp: int, tp: int,
                micro_batch_size: int, place: RankPlace, cp: int = 1,
                max_tokens: Optional[int] = None) -> list[MiniShare]:
    """Rank 0: the mini-batches of the rank at ``place`` (its samples; its CP/SP slice of its stage's trace
    columns).

    Micro-batches hold ``micro_batch_size`` samples, or (dynamic batching, ``max_tokens``) at most ``max_tokens``
    padded tokens; either way every data-parallel rank gets the same number of non-empty micro-batches and the same
    number of samples per mini-batch. The normalisers (``global_tokens``, ``global_seqs``) are the whole mini-batch's,
    whatever the split, so the loss is the exact global token-mean under both."""
    size = len(samples) // num_mini_batches
    minis = []
    for k in range(num_mini_batches):
        chunk = samples[k * size:(k + 1) * size]
        lengths = [len(s.prompt) + len(s.response) for s in chunk]
        plan = (plan_micro_batches(lengths, dp, max_tokens=max_tokens, cp=cp, equal_counts=True) if max_tokens
                else plan_micro_batches(lengths, dp, micro_batch_size=max(1, micro_batch_size)))
        micros = []
        for ids in plan.micro_batches[place.dp_rank]:
            picked = [chunk[i] for i in ids]
            routing = None
            if trace is not None:
                packed = pack(picked, cp=cp, sp=tp, sample_ids=[k * size + i for i in ids])
                routing = batch_shard(trace, packed, place.cp_rank, place.tp_rank, place.layer_columns).ids
            micros.append(MicroShare(picked, routing))
        minis.append(MiniShare(micros, float(sum(len(s.response) for s in chunk)), float(len(chunk))))
    return minis


def share_bytes(minis: Sequence[MiniShare]) -> int:
    """Bytes of a rank's own share: tokens (int32), log-probs (float32), advantages (float64), its two lengths (int32)
    per sample, its routing slice."""
    total = 0
    for mini in minis:
        for micro in mini.micros:
            for s in micro.samples:
                total += 4 * (len(s.prompt) + len(s.response)) + 4 * len(s.response) + 8 + 8
            total += 0 if micro.routing is None else micro.routing.nbytes
    return total


def encode(minis: Sequence[MiniShare]) -> np.ndarray:
    """A rank's share as one uint8 buffer (layout in the module docstring)."""
    counts = [len(minis)]
    scalars, tokens, logprobs, advantages, routing = [], [], [], [], []
    itemsize = 0
    for mini in minis:
        counts.append(len(mini.micros))
        scalars += [mini.global_tokens, mini.global_seqs]
        for micro in mini.micros:
            counts += [len(micro.samples), 0 if micro.routing is None else len(micro.routing)]
            for s in micro.samples:
                counts += [len(s.prompt), len(s.response)]
                tokens += [np.asarray(s.prompt), np.asarray(s.response)]
                logprobs.append(np.asarray(s.rollout_logprobs, np.float32))
                advantages.append(float(s.advantage))
            if micro.routing is not None:
                routing.append(np.ascontiguousarray(micro.routing).view(np.uint8).reshape(-1))
                itemsize = micro.routing.dtype.itemsize
    parts = [np.asarray(counts, "<i4").view(np.uint8), np.asarray(scalars, "<f8").view(np.uint8),
             np.concatenate(tokens or [np.zeros(0)]).astype("<i4").view(np.uint8),
             np.concatenate(logprobs or [np.zeros(0, np.float32)]).astype("<f4").view(np.uint8),
             np.asarray(advantages, "<f8").view(np.uint8),
             np.concatenate(routing) if routing else np.zeros(0, np.uint8)]
    header = np.asarray([len(counts), len(scalars), sum(t.size for t in tokens),
                         sum(lp.size for lp in logprobs), parts[-1].size, itemsize], "<i8")
    return np.concatenate([header.view(np.uint8)] + parts)


def decode(buffer: np.ndarray, topk: int, num_layer_columns: int) -> list[MiniShare]:
    """Inverse of :func:`encode` on the receiving rank (routing rows shaped [T, num_layer_columns, topk])."""
    header = buffer[:8 * _HEADER].view("<i8")
    n_counts, n_scalars, n_tokens, n_logprobs, n_routing, itemsize = (int(v) for v in header)
    offset = 8 * _HEADER

    def take(count: int, dtype: str) -> np.ndarray:
        nonlocal offset
        width = np.dtype(dtype).itemsize * count
        out = buffer[offset:offset + width].view(dtype)
        offset += width
        return out

    counts, scalars = iter(take(n_counts, "<i4").tolist()), iter(take(n_scalars, "<f8").tolist())
    tokens, logprobs = take(n_tokens, "<i4").astype(np.int64), take(n_logprobs, "<f4").astype(np.float32)
    layout = []  # per mini: ([per micro: (rows, [(prompt_len, response_len)])], global_tokens, global_seqs)
    for _ in range(next(counts)):
        micros = []
        for _ in range(next(counts)):
            n_samples, rows = next(counts), next(counts)
            micros.append((rows, [(next(counts), next(counts)) for _ in range(n_samples)]))
        layout.append((micros, next(scalars), next(scalars)))
    advantages = take(sum(len(lens) for micros, _, _ in layout for _, lens in micros), "<f8")
    routing_bytes = take(n_routing, "<u1")
    row_dtype = np.dtype({1: "<u1", 2: "<u2", 4: "<i4"}.get(itemsize, "<u1"))
    minis, t_at, lp_at, adv_at, r_at = [], 0, 0, 0, 0
    for micros, global_tokens, global_seqs in layout:
        shares = []
        for rows, lens in micros:
            samples = []
            for prompt_len, response_len in lens:
                end = t_at + prompt_len + response_len
                samples.append(Sample(prompt=tokens[t_at:t_at + prompt_len], response=tokens[t_at + prompt_len:end],
                                      rollout_logprobs=logprobs[lp_at:lp_at + response_len],
                                      advantage=float(advantages[adv_at])))
                t_at, lp_at, adv_at = end, lp_at + response_len, adv_at + 1
            routing = None
            if n_routing:
                width = rows * num_layer_columns * topk * itemsize
                routing = routing_bytes[r_at:r_at + width].view(row_dtype).reshape(rows, num_layer_columns, topk)
                r_at += width
            shares.append(MicroShare(samples, routing))
        minis.append(MiniShare(shares, global_tokens, global_seqs))
    return minis


def local_routing(routing: np.ndarray, samples: Sequence[Sample], packed: Any, cp_rank: int, tp_rank: int,
                  layer_columns: Sequence[int], num_experts: int) -> LocalTrace:
    """The receiver's :class:`LocalTrace` of a micro-batch it packed (``packed``): the slot index comes from the
    same layout (SGLang traces: rows_i = tokens_i − 1)."""
    rows = np.asarray([len(s.prompt) + len(s.response) - 1 for s in samples], np.int64)
    return LocalTrace(routing, local_index(rows, packed, cp_rank, tp_rank), tuple(int(c) for c in layer_columns),
                      num_experts)


def build_micro_batches(mini: MiniShare, cp: int, cp_rank: int, tp: int, tp_rank: int,
                        layer_columns: Sequence[int] = (), num_experts: int = 0) -> list[MicroBatch]:
    """A received mini-batch -> this rank's micro-batches: each packed for (cp, sp = tp), the slots of its CP/SP rank,
    the mini-batch's normalisers (global response tokens and sequences: the exact global token-mean whatever the
    micro-batch split) and, with r3, its routing slice (pads route live)."""
    out = []
    for micro in mini.micros:
        packed = pack(micro.samples, cp=cp, sp=tp)
        mb = micro_batch(packed, cp_rank, tp_rank)
        mb.global_tokens, mb.global_seqs = mini.global_tokens, mini.global_seqs
        if micro.routing is not None:
            mb.routing = local_routing(micro.routing, micro.samples, packed, cp_rank, tp_rank, layer_columns,
                                       num_experts)
        out.append(mb)
    return out


class BatchDelivery:
    """Sends each rank its share of a step (rank 0) and receives it (every other rank); counts received bytes.

    Args:
        place: this rank's :class:`RankPlace` (gathered once from every rank).
        topk: experts per token (the routing rows' last axis).
    """

    def __init__(self, place: RankPlace, topk: int):
        self.group = dist.new_group(backend="gloo")  # CPU buffers, whatever the training backend
        places: list = [None] * dist.get_world_size()
        dist.all_gather_object(places, place, group=self.group)
        self.places: list[RankPlace] = places
        self.place = place
        self.topk = topk
        self.received_bytes = 0

    def scatter(self, shares: Optional[list[list[MiniShare]]]) -> list[MiniShare]:
        """Rank 0 passes every rank's shares (index = rank) and keeps its own; the others receive theirs."""
        if dist.get_rank() == 0:
            for dst in range(1, len(self.places)):
                buffer = encode(shares[dst])
                dist.send(torch.tensor([buffer.size], dtype=torch.int64), dst, group=self.group)
                dist.send(torch.from_numpy(buffer), dst, group=self.group)
            return shares[0]
        size = torch.zeros(1, dtype=torch.int64)
        dist.recv(size, 0, group=self.group)
        buffer = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(buffer, 0, group=self.group)
        self.received_bytes += 8 + int(size)
        return decode(buffer.numpy(), self.topk, len(self.place.layer_columns))
