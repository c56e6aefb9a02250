"""Numpy reference packer: same API and bit-identical output as the C++ packer (``native``), built from the index
maps of ``layout`` (take / scatter over concatenated per-sample streams)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vespo_megatron.packing.batch import PackedBatch, PackStats, check_unpack_values, split_by_sequence
from vespo_megatron.packing.layout import PackLayout, build_layout, check_parallel, scatter, source_index, take
from vespo_megatron.packing.sample import Sample, resolve_sample_ids, sequence_scalars
from vespo_megatron.packing.validation import SampleSpec, validate_samples


def filler_row(layers: int, topk: int, dtype: np.dtype) -> np.ndarray:
    """[layers, topk] routing row with the distinct expert ids 0..topk−1 in every layer (what pads get)."""
    return np.broadcast_to(np.arange(topk, dtype=dtype), (layers, topk))


def _stream(arrays: list[np.ndarray], dtype: np.dtype, tail: tuple[int, ...] = ()) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.empty((0,) + tail, dtype)


def _stats(specs: list[SampleSpec], lay: PackLayout, has_logprobs: bool, has_routing: bool) -> PackStats:
    given = np.array([s.logprobs_given for s in specs], np.int64)
    kept = np.array([s.logprobs_kept for s in specs], np.int64)
    resp = np.array([s.response_len for s in specs], np.int64)
    missing = resp - kept if has_logprobs else np.zeros_like(resp)
    padded = int(lay.cu_seqlens_padded[-1])
    return PackStats(
        samples=len(specs),
        tokens=int(lay.cu_seqlens[-1]),
        response_tokens=int(resp.sum()),
        padded_tokens=padded,
        tail_pad_tokens=lay.cp * lay.local_tokens - padded,
        logprobs_missing=int(missing.sum()),
        logprobs_truncated=int((given - kept).sum()),
        samples_missing=int((missing > 0).sum()),
        samples_truncated=int((given > kept).sum()),
        routing_filler_rows=len(specs) if has_routing else 0,
    )


def pack(
    samples: Sequence[Sample],
    cp: int = 1,
    sp: int = 1,
    tail_align: int = 1,
    truncate: bool = False,
    sample_ids: Sequence[int] | None = None,
) -> PackedBatch:
    """Pack ``samples`` (one micro-batch, in order) for context-parallel size cp and sequence-parallel size sp."""
    check_parallel(cp, sp, tail_align)
    ids = resolve_sample_ids(samples, sample_ids)
    specs = validate_samples(samples, ids, truncate)
    prompt_lens = np.array([s.prompt_len for s in specs], np.int64)
    resp_lens = np.array([s.response_len for s in specs], np.int64)
    lay = build_layout(prompt_lens + resp_lens, cp, sp, tail_align)

    tokens = take(_stream([a for s in samples for a in (s.prompt, s.response)], np.int64), lay.gather, 0)
    resp_index = source_index(lay, prompt_lens, resp_lens)
    masks = [np.ones(r, np.float32) if s.loss_mask is None else s.loss_mask for s, r in zip(samples, resp_lens)]
    loss_mask = take(_stream(masks, np.float32), resp_index, 0)

    logprobs = valid = routing = None
    has_lp = bool(samples) and samples[0].rollout_logprobs is not None
    if has_lp:
        kept = np.array([s.logprobs_kept for s in specs], np.int64)
        lp_index = source_index(lay, prompt_lens, kept)
        lps = [s.rollout_logprobs[:k] for s, k in zip(samples, kept.tolist())]
        logprobs = take(_stream(lps, np.float32), lp_index, 0)
        valid = lp_index >= 0
    if samples and samples[0].routing is not None:
        r0 = samples[0].routing
        rows = prompt_lens + resp_lens - 1
        stream = _stream([s.routing for s in samples], r0.dtype, r0.shape[1:])
        fill = filler_row(r0.shape[1], r0.shape[2], r0.dtype)
        routing = take(stream, source_index(lay, np.zeros_like(rows), rows), fill)

    return PackedBatch(
        cp=cp,
        sp=sp,
        tail_align=tail_align,
        sample_ids=ids,
        prompt_lens=prompt_lens,
        response_lens=resp_lens,
        cu_seqlens=lay.cu_seqlens,
        cu_seqlens_padded=lay.cu_seqlens_padded,
        tokens=tokens,
        position_ids=lay.position,
        seq_index=lay.seq_index,
        loss_mask=loss_mask,
        rollout_logprobs=logprobs,
        rollout_logprob_valid=valid,
        routing=routing,
        advantages=sequence_scalars(samples, ids, "advantage"),
        rewards=sequence_scalars(samples, ids, "reward"),
        stats=_stats(specs, lay, has_lp, routing is not None),
    )


def unpack(batch: PackedBatch, values: np.ndarray) -> list[np.ndarray]:
    """Per-token outputs [cp, t, ...] (e.g. training log-probs, entropy) -> per-sequence [n_i, ...], batch order."""
    check_unpack_values(batch, values)
    lay = build_layout(batch.seq_lens, batch.cp, batch.sp, batch.tail_align)
    return split_by_sequence(scatter(values, lay.gather, int(lay.cu_seqlens[-1])), lay.cu_seqlens)
