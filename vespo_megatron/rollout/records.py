"""Rollout records, parsed and validated from SGLang /generate responses.

A record holds, for one sample: prompt ids [P], response ids [N], per-token rollout log-probs μ [N] (fp32), the
routing trace int32 [P + N − 1 − start, num_hidden_layers, topk] (or None) and SGLang's finish_reason dict.
Every malformed response raises :class:`RolloutResponseError` naming the request id and the field.
"""
from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

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


@dataclass(frozen=True)
class RoutingSpec:
    """What a routing trace must look like: [rows, num_layers, topk] with ids in [0, num_experts)."""

    num_layers: int
    topk: int
    num_experts: int

    @classmethod
    def from_hf_config(cls, config: Any) -> "RoutingSpec":
        """From a transformers config (Qwen3-MoE ``num_experts`` or Mixtral ``num_local_experts``)."""
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts")
        return cls(int(config.num_hidden_layers), int(config.num_experts_per_tok), int(experts))


def decode_routed_experts(encoded: Any, rows: int, spec: RoutingSpec, rid: str, dtype: str = "int32") -> np.ndarray:
    """SGLang ``meta_info.routed_experts`` (base64 of flat little-endian ints) -> int32 [rows, layers, topk]."""
    if not isinstance(encoded, str):
        raise RolloutResponseError(f"request {rid}: routed_experts must be a base64 string, got {type(encoded).__name__}")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error as err:
        raise RolloutResponseError(f"request {rid}: routed_experts is not valid base64 (truncated?): {err}") from None
    item = np.dtype(dtype).newbyteorder("<")
    expected = rows * spec.num_layers * spec.topk
    if len(raw) != expected * item.itemsize:
        raise RolloutResponseError(
            f"request {rid}: routed_experts holds {len(raw)} bytes, expected {expected * item.itemsize} "
            f"= {rows} rows x {spec.num_layers} layers x {spec.topk} experts x {item.itemsize} bytes (truncated?)")
    trace = np.frombuffer(raw, dtype=item).astype(np.int32).reshape(rows, spec.num_layers, spec.topk)
    bad = np.argwhere((trace < 0) | (trace >= spec.num_experts))
    if len(bad):
        row, layer, _ = bad[0]
        raise RolloutResponseError(f"request {rid}: routed_experts row {row} layer {layer} holds expert id "
                                   f"{trace[tuple(bad[0])]} outside [0, {spec.num_experts})")
    return trace


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


def record_from_response(response: Any, rid: str, prompt_ids: list[int], routing: RoutingSpec | None = None,
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
        if meta.get("routed_experts") is None:
            raise RolloutResponseError(
                f"request {rid}: meta_info has no routed_experts, but routing replay needs it (start SGLang with "
                "--enable-return-routed-experts and send return_routed_experts=true)")
        rows = len(prompt_ids) + len(output_ids) - 1 - routed_experts_start_len
        trace = decode_routed_experts(meta["routed_experts"], rows, routing, rid,
                                      meta.get("routed_experts_dtype", "int32"))
    return RolloutRecord(
        rid=rid, prompt_ids=np.asarray(prompt_ids, dtype=np.int64), response_ids=np.asarray(output_ids, dtype=np.int64),
        logprobs=logprobs, routing=trace, routed_experts_start_len=routed_experts_start_len, finish_reason=finish,
        weight_version=meta.get("weight_version"),
    )
