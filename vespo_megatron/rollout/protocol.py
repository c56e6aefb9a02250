"""SGLang's /generate request and response layout, for the CPU engine and its HTTP server.

A request body (``GenerateReqInput``) is split into one :class:`GenerateItem` per generated sample, in SGLang's order
(prompt-major when ``n`` > 1); each item's result becomes one response dict::

    {"output_ids": [...], "meta_info": {"id", "finish_reason", "prompt_tokens", "completion_tokens",
     "cached_tokens", "e2e_latency", "weight_version", "input_token_logprobs", "output_token_logprobs",
     "routed_experts"}}

The engine has no tokenizer (as SGLang with ``--skip-tokenizer-init``): ``text`` is rejected, ``input_ids`` are
required, and the response has no ``text`` field. Every bad field raises ValueError naming it (HTTP 400).
"""
from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from vespo_megatron.rollout.sampling import SamplingParams

# Top-level fields handled here; any other field must be null/false/empty (ignored) or the request is rejected.
_HANDLED = {
    "text", "input_ids", "input_embeds", "sampling_params", "rid", "stream", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "token_ids_logprob", "return_text_in_logprobs", "return_routed_experts",
    "routed_experts_start_len",
}


@dataclass(frozen=True)
class GenerateItem:
    """One sample to generate. ``logprob_start_len`` = −1: output log-probs only; p >= 0: also prompt tokens [p, P)."""

    rid: str
    input_ids: tuple[int, ...]
    params: SamplingParams
    return_logprob: bool
    logprob_start_len: int
    return_routed_experts: bool
    routed_experts_start_len: int


def _per_prompt(value: Any, num_prompts: int, is_batch: bool, name: str) -> list[Any]:
    """Broadcast a scalar field to every prompt, or check a per-prompt list has one entry per prompt."""
    if is_batch and isinstance(value, list):
        if len(value) != num_prompts:
            raise ValueError(f"{name} has {len(value)} entries for {num_prompts} prompts")
        return value
    return [value] * num_prompts


def _prompts(body: dict[str, Any]) -> tuple[list[tuple[int, ...]], bool]:
    given = [key for key in ("text", "input_ids", "input_embeds") if body.get(key) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of text, input_ids or input_embeds (got {given or 'none'})")
    if given[0] == "text":
        raise ValueError("text input needs a tokenizer and this server runs without one (like SGLang "
                         "--skip-tokenizer-init): send input_ids")
    if given[0] == "input_embeds":
        raise ValueError("input_embeds is not supported by this engine: send input_ids")
    ids = body["input_ids"]
    is_batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
    prompts = ids if is_batch else [ids]
    if not prompts:
        raise ValueError("input_ids is empty")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(f"input_ids[{i}] must be a non-empty list of token ids")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise ValueError(f"input_ids[{i}] must hold non-negative int token ids")
    return [tuple(p) for p in prompts], is_batch


def _check_start(value: Any, low: int, prompt_len: int, name: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= prompt_len:
        raise ValueError(f"{where}: {name}={value!r} must be an int in [{low}, prompt_tokens={prompt_len}]")
    return value


def parse_generate_request(body: Any) -> tuple[list[GenerateItem], bool]:
    """Split a /generate body into items; returns (items, is_batch). ``is_batch``: answer with a JSON list."""
    if not isinstance(body, dict):
        raise ValueError("the /generate body must be a JSON object")
    for key, value in body.items():
        if key not in _HANDLED and value not in (None, False, [], {}):
            raise ValueError(f"field {key!r} is not supported by this engine")
    if body.get("stream"):
        raise ValueError("stream=true is not supported by this engine: send a non-streaming request")
    if body.get("top_logprobs_num") or body.get("token_ids_logprob"):
        raise ValueError("top_logprobs_num / token_ids_logprob are not supported by this engine")
    prompts, is_batch = _prompts(body)
    count = len(prompts)
    sampling = _per_prompt(body.get("sampling_params"), count, is_batch, "sampling_params")
    rids = _per_prompt(body.get("rid"), count, is_batch, "rid")
    logprob = _per_prompt(body.get("return_logprob", False), count, is_batch, "return_logprob")
    lp_start = _per_prompt(body.get("logprob_start_len", -1), count, is_batch, "logprob_start_len")
    routed = _per_prompt(body.get("return_routed_experts", False), count, is_batch, "return_routed_experts")
    re_start = _per_prompt(body.get("routed_experts_start_len", 0), count, is_batch, "routed_experts_start_len")

    params = [SamplingParams.from_dict(sampling[i], f"prompt {i}") for i in range(count)]
    is_batch = is_batch or any(p.n > 1 for p in params)
    shared_rid = body.get("rid") if isinstance(body.get("rid"), str) else None
    items: list[GenerateItem] = []
    for i, prompt in enumerate(prompts):
        where = f"prompt {i}"
        for s in range(params[i].n):
            if shared_rid is not None and is_batch:
                rid = f"{shared_rid}_{len(items)}"
            elif rids[i] is not None:
                rid = str(rids[i]) if params[i].n == 1 else f"{rids[i]}_{s}"
            else:
                rid = uuid.uuid4().hex
            items.append(GenerateItem(
                rid=rid, input_ids=prompt, params=params[i], return_logprob=bool(logprob[i]),
                logprob_start_len=_check_start(lp_start[i], -1, len(prompt), "logprob_start_len", where),
                return_routed_experts=bool(routed[i]),
                routed_experts_start_len=_check_start(re_start[i], 0, len(prompt), "routed_experts_start_len", where),
            ))
    seen: set[str] = set()
    for item in items:
        if item.rid in seen:
            raise ValueError(f"duplicate rid {item.rid!r}")
        seen.add(item.rid)
    return items, is_batch


def finish_length(length: int) -> dict[str, Any]:
    return {"type": "length", "length": length}


def finish_stop(matched: int) -> dict[str, Any]:
    return {"type": "stop", "matched": matched}


def encode_routed_experts(routing: np.ndarray) -> str:
    """SGLang's encoding of a routing trace [rows, layers, topk]: base64 of flat row-major little-endian int32."""
    return base64.b64encode(np.ascontiguousarray(routing, dtype="<i4").tobytes()).decode("ascii")


def logprob_triples(logprobs: list[float | None], token_ids: list[int]) -> list[list[Any]]:
    """SGLang's ``[logprob, token_id, text]`` entries (text is null: there is no tokenizer)."""
    return [[lp, tok, None] for lp, tok in zip(logprobs, token_ids)]


def response_dict(item: GenerateItem, output_ids: list[int], output_logprobs: list[float],
                  input_logprobs: list[float | None], routing: np.ndarray | None, finish_reason: dict[str, Any],
                  weight_version: str, latency_s: float) -> dict[str, Any]:
    """One non-streaming /generate result in SGLang's layout.

    ``input_logprobs`` covers prompt tokens [logprob_start_len, P) (the first prompt token's entry is None);
    ``routing`` is [P + N − 1 − routed_experts_start_len, layers, topk].
    """
    meta: dict[str, Any] = {
        "id": item.rid, "finish_reason": finish_reason, "prompt_tokens": len(item.input_ids),
        "completion_tokens": len(output_ids), "cached_tokens": 0, "e2e_latency": latency_s,
        "weight_version": weight_version,
    }
    if item.return_logprob:
        prompt_part = list(item.input_ids[item.logprob_start_len:]) if item.logprob_start_len >= 0 else []
        meta["input_token_logprobs"] = logprob_triples(input_logprobs, prompt_part)
        meta["output_token_logprobs"] = logprob_triples(output_logprobs, output_ids)
    if item.return_routed_experts:
        meta["routed_experts"] = encode_routed_experts(routing)
    return {"output_ids": output_ids, "meta_info": meta}


def error_body(message: str) -> dict[str, Any]:
    """SGLang's error response for a ValueError in /generate (HTTP 400)."""
    return {"error": {"message": message}}
