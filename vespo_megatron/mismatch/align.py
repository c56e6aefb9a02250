"""Alignment of rollout and training tokens for the mismatch tool.

Sample i has n = P + N tokens. The training pass gives log-probs [n − 1] (entry p = logπ(token p+1 | tokens ≤ p)) and
routing [n, num_moe_layers, k] (row p = the router input token p). Response token j (token P + j) is scored by the
forward of token P + j − 1, so it takes entry and row P − 1 + j of both sides: prompt tokens are not scored and the
last token's row (which has no rollout row) is not compared. Rollout routing keeps the MoE columns of the HF layers
(dense layers are zero rows). Errors name the sample and its request id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vespo_megatron.hf_config import moe_layers, num_experts
from vespo_megatron.packing import PackedBatch, restore_order, unpack
from vespo_megatron.rollout.records import RolloutRecord
from vespo_megatron.routing.trace import TraceSpec


def trace_spec(hf_config: Any) -> TraceSpec:
    """The routing trace layout of an HF config: its MoE layers (HF indices), experts and top-k."""
    return TraceSpec.from_layer_pattern(moe_layers(hf_config), num_experts(hf_config), hf_config.num_experts_per_tok)


@dataclass(frozen=True)
class TrainSide:
    """One training pass, per sample i (n_i = P_i + N_i tokens): ``logprobs[i]`` [n_i − 1] float, entry p =
    logπ_train(token p+1 | tokens ≤ p); ``routing[i]`` [n_i, num_moe_layers, k] int, the experts of token p's
    forward."""

    logprobs: list[np.ndarray]
    routing: list[np.ndarray]


@dataclass(frozen=True)
class Aligned:
    """Response tokens of every sample, in sample order: log-probs [num_tokens], seq_ids [num_tokens] (the sample
    index), experts [num_tokens, num_moe_layers, k] of the forward that scored each token."""

    logp_train: np.ndarray
    logp_rollout: np.ndarray
    seq_ids: np.ndarray
    experts_train: np.ndarray
    experts_rollout: np.ndarray


def check_record(i: int, record: RolloutRecord, spec: TraceSpec) -> None:
    """Shapes of one record: μ [N], routing [P + N − 1, num_hf_layers, k] from row 0."""
    where = f"sample {i} (request {record.rid})"
    n_prompt, n_resp = len(record.prompt_ids), len(record.response_ids)
    if n_prompt < 1:
        raise ValueError(f"{where}: empty prompt")
    if record.logprobs.shape != (n_resp,):
        raise ValueError(f"{where}: logprobs of shape {record.logprobs.shape} for {n_resp} response tokens")
    if record.routing is None:
        raise ValueError(f"{where}: no routing; generate with return_routed_experts=True")
    if record.routed_experts_start_len:
        raise ValueError(f"{where}: routing starts at row {record.routed_experts_start_len}; the tool needs every "
                         "row (routed_experts_start_len=0)")
    want = (n_prompt + n_resp - 1, spec.num_hf_layers, spec.topk)
    if record.routing.shape != want:
        raise ValueError(f"{where}: routing of shape {record.routing.shape}, expected {want}")


def align(records: Sequence[RolloutRecord], side: TrainSide, spec: TraceSpec) -> Aligned:
    """Response tokens of both sides, aligned as in the module docstring (errors name the sample and request)."""
    if len(side.logprobs) != len(records) or len(side.routing) != len(records):
        raise ValueError(f"training side has {len(side.logprobs)} log-prob and {len(side.routing)} routing arrays "
                         f"for {len(records)} records")
    parts: list[tuple[np.ndarray, ...]] = []
    for i, record in enumerate(records):
        check_record(i, record, spec)
        n_prompt, n = len(record.prompt_ids), len(record.prompt_ids) + len(record.response_ids)
        logp, routing = np.asarray(side.logprobs[i]), np.asarray(side.routing[i])
        if logp.shape != (n - 1,):
            raise ValueError(f"sample {i} (request {record.rid}): training log-probs of shape {logp.shape}, expected "
                             f"({n - 1},)")
        if routing.shape != (n, spec.num_moe_layers, spec.topk):
            raise ValueError(f"sample {i} (request {record.rid}): training routing of shape {routing.shape}, expected "
                             f"{(n, spec.num_moe_layers, spec.topk)}")
        rows = slice(n_prompt - 1, n - 1)
        parts.append((logp[rows], record.logprobs, np.full(n - n_prompt, i), routing[rows],
                      record.routing[rows][:, list(spec.moe_layers)]))
    train, rollout, seq, ex_train, ex_rollout = (np.concatenate(column) for column in zip(*parts))
    return Aligned(train.astype(np.float64), rollout.astype(np.float64), seq, ex_train, ex_rollout)


def per_sample(batches: Sequence[PackedBatch], slot_values: Sequence[np.ndarray], num_samples: int) -> list[np.ndarray]:
    """Per-slot values of each micro-batch ([t, ...], CP size 1) -> one array [n_i, ...] per sample id, token order."""
    per_batch = [unpack(b, np.ascontiguousarray(v)[None]) for b, v in zip(batches, slot_values, strict=True)]
    return restore_order(batches, per_batch, num_samples)


def training_side(batches: Sequence[PackedBatch], logprobs: Sequence[np.ndarray], routing: Sequence[np.ndarray],
                  num_samples: int) -> TrainSide:
    """A :class:`TrainSide` from per-micro-batch slot log-probs [t] (slot p scores token p+1) and slot routing
    [t, num_moe_layers, k]; the last slot of a sample scores nothing and is dropped."""
    logp = per_sample(batches, logprobs, num_samples)
    return TrainSide([lp[:-1] for lp in logp], per_sample(batches, routing, num_samples))
