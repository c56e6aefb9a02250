"""Rollout records, parsed and validated from SGLang /generate responses.

A record holds, for one sample: prompt ids [P], response ids [N], per-token rollout log-probs μ [N] (fp32), the
routing trace int32 [P + N − 1 − start, num_hidden_layers, topk] (or None) and SGLang's finish_reason dict.
Routing is decoded and its MoE layers validated by :mod:`vespo_megatron.routing.trace` (ids in [0, E), k distinct
per row, no uncaptured layer). Every malformed response raises :class:`RolloutResponseError` naming the request id
and the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vespo_megatron.routing.trace import TraceError, TracePart, TraceSpec, decode_part, validate

_FINISH_TYPES = {"stop", "length"}


class RolloutResponseError(ValueError):
    """A response that cannot become a rollout record; the message names the request."""


@dataclass(frozen=True)
class RolloutRecord:
    """One generated sample. ``routing`` row p is the forward whose input is token p of prompt + response."""

    rid: str
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    logprobs: np.ndarray
    routing: np.ndarray | None
    routed_experts_start_len: int
    finish_reason: dict[str, Any]
    weight_version: str | None


def _routing(meta: dict[str, Any], rows: int, spec: TraceSpec, rid: str, start_len: int) -> np.ndarray:
    """Decode (routing.trace) and validate the MoE layers of ``routed_experts`` -> int32 [rows, hf layers, topk]."""
    if meta.get("routed_experts") is None:
        raise RolloutResponseError(
            f"request {rid}: meta_info has no routed_experts, but routing replay needs it (start SGLang with "
            "--enable-return-routed-experts and send return_routed_experts=true)")
    try:
        trace = decode_part(TracePart.from_meta_info(meta, start_len), spec, sample=rid, expected_rows=rows)
        validate(trace[:, list(spec.moe_layers)], spec, sample=rid)
    except TraceError as err:
        raise RolloutResponseError(f"request {rid}: {err}") from err
    return trace.astype(np.int32)


def _output_logprobs(meta: dict[str, Any], output_ids: list[int], rid: str) -> np.ndarray:
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise RolloutResponseError(f"request {rid}: meta_info has no output_token_logprobs (send return_logprob)")
    if len(entries) != len(output_ids):
        raise RolloutResponseError(
            f"request {rid}: {len(entries)} output log-probs for {len(output_ids)} output tokens")
    values = []
    for pos, (entry, token) in enumerate(zip(entries, output_ids)):
        if not isinstance(entry, list) or len(entry) < 2 or entry[1] != token:
            raise RolloutResponseError(f"request {rid}: output_token_logprobs[{pos}]={entry!r} is not a "
                                       f"[logprob, token_id={token}, text] entry")
        value = entry[0]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value > 0.0:
            raise RolloutResponseError(f"request {rid}: output log-prob {value!r} at position {pos} is not finite <= 0")
        values.append(value)
    return np.asarray(values, dtype=np.float32)


def record_from_response(response: Any, rid: str, prompt_ids: list[int], routing: TraceSpec | None = None,
                         routed_experts_start_len: int = 0) -> RolloutRecord:
    """Validate one /generate result dict and build its record; ``routing`` set = the trace is required."""
    if not isinstance(response, dict) or not isinstance(response.get("meta_info"), dict):
        raise RolloutResponseError(f"request {rid}: response is not an object with meta_info: {str(response)[:200]}")
    meta = response["meta_info"]
    finish = meta.get("finish_reason")
    if not isinstance(finish, dict) or finish.get("type") not in _FINISH_TYPES:
        raise RolloutResponseError(f"request {rid}: did not finish (finish_reason={finish!r})")
    output_ids = response.get("output_ids")
    if output_ids is None:  # older SGLang: the token ids only live in the log-prob triples
        output_ids = [entry[1] for entry in meta.get("output_token_logprobs") or []]
    if not isinstance(output_ids, list) or not all(isinstance(t, int) for t in output_ids):
        raise RolloutResponseError(f"request {rid}: output_ids is not a list of token ids")
    logprobs = _output_logprobs(meta, output_ids, rid)
    trace = None
    if routing is not None:
        rows = len(prompt_ids) + len(output_ids) - 1 - routed_experts_start_len
        trace = _routing(meta, rows, routing, rid, routed_experts_start_len)
    return RolloutRecord(
        rid=rid, prompt_ids=np.asarray(prompt_ids, dtype=np.int64), response_ids=np.asarray(output_ids, dtype=np.int64),
        logprobs=logprobs, routing=trace, routed_experts_start_len=routed_experts_start_len, finish_reason=finish,
        weight_version=meta.get("weight_version"),
    )
