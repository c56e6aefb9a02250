"""SGLang 0.5.23's /generate request and response layout, for the CPU engine and its HTTP server.

A request body (``GenerateReqInput``) is split into one :class:`GenerateItem` per generated sample, in SGLang's order
(prompt-major when ``n`` > 1) and with its request ids (``managers/io_struct.py`` ``normalize_batch_and_arguments``;
with ``n`` > 1 every sample gets a fresh uuid, ``tokenizer_manager.py`` ``regenerate_rid``). Unknown top-level keys
are ignored, as the release does; fields the CPU engine cannot honour (streaming, images, LoRA, top log-probs, ...)
are refused by name. Each item's result becomes one response dict::

    {"text": "...", "output_ids": [...], "meta_info": {"id", "finish_reason", "prompt_tokens", "weight_version",
     "num_retractions", "completion_tokens", "cached_tokens", "reasoning_tokens", "e2e_latency",
     "input_token_logprobs", "output_token_logprobs", "routed_experts"}}

``text`` is there only when the engine has a tokenizer (SGLang without one, ``--skip-tokenizer-init``, answers
``output_ids`` and ``meta_info`` only, and refuses ``text`` input). Every bad field raises ValueError naming it (HTTP
400).
"""
from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from vespo_megatron.rollout.sampling import SamplingParams

# GenerateReqInput fields the CPU engine cannot honour: refused unless null/false/empty. Other keys are ignored.
_UNSUPPORTED = (
    "input_embeds", "image_data", "video_data", "audio_data", "lora_path", "return_hidden_states", "stream",
    "top_logprobs_num", "token_ids_logprob", "session_params", "session_id", "custom_logit_processor",
    "return_sampling_mask", "return_entropy", "return_indexer_topk", "positional_embed_overrides",
)
_PER_PROMPT_LOGPROB = ("return_logprob", "logprob_start_len")


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


def _check_ids(prompts: list[Any]) -> None:
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(f"input_ids[{i}] must be a non-empty list of token ids")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise ValueError(f"input_ids[{i}] must hold non-negative int token ids")


def _prompts(body: dict[str, Any], encode: Callable[[str], list[int]] | None) -> tuple[list[tuple[int, ...]], bool]:
    given = [key for key in ("text", "input_ids", "input_embeds") if body.get(key) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of text, input_ids or input_embeds (got {given or 'none'})")
    if given[0] == "input_embeds":
        raise ValueError("input_embeds is not supported by this engine: send input_ids")
    if given[0] == "text":
        if encode is None:
            raise ValueError("text input needs a tokenizer and this server runs without one (like SGLang "
                             "--skip-tokenizer-init): send input_ids")
        text = body["text"]
        is_batch = isinstance(text, list)
        texts = text if is_batch else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        prompts = [list(encode(t)) for t in texts]
    else:
        ids = body["input_ids"]
        is_batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        prompts = ids if is_batch else [ids]
    if not prompts:
        raise ValueError("input_ids is empty")
    _check_ids(prompts)
    return [tuple(p) for p in prompts], is_batch


def _rids(rid: Any, count: int, n: int, is_batch: bool) -> list[str]:
    """Request ids per sample, as the release assigns them (io_struct ``_normalize_rid``, ``regenerate_rid``)."""
    if not is_batch:
        return [str(rid) if rid is not None else uuid.uuid4().hex]
    if isinstance(rid, list):
        if len(rid) != count:
            raise ValueError(f"rid has {len(rid)} entries for {count} prompts")
        named = [str(r) for r in rid]
    elif isinstance(rid, str):
        named = [f"{rid}_{i}" for i in range(count)]
    elif rid is None:
        named = [uuid.uuid4().hex for _ in range(count)]
    else:
        raise ValueError("rid must be a string or a list of strings")
    duplicates = sorted({r for r in named if named.count(r) > 1})
    if duplicates:
        raise ValueError(f"duplicate rid {duplicates[0]!r} in the request")
    if n == 1:
        return named
    return [uuid.uuid4().hex for _ in range(count * n)]  # every sample of n > 1 gets a fresh uuid


def _check_start(value: Any, low: int, prompt_len: int, name: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= prompt_len:
        raise ValueError(f"{where}: {name}={value!r} must be an int in [{low}, prompt_tokens={prompt_len}]")
    return value


def parse_generate_request(body: Any, encode: Callable[[str], list[int]] | None = None
                           ) -> tuple[list[GenerateItem], bool]:
    """Split a /generate body into items; returns (items, is_batch). ``is_batch``: answer with a JSON list.

    ``encode``: the engine's tokenizer (text -> ids), or None (text input refused, as with --skip-tokenizer-init).
    """
    if not isinstance(body, dict):
        raise ValueError("the /generate body must be a JSON object")
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}, 0):
            raise ValueError(f"field {key!r} is not supported by this engine")
    prompts, is_batch = _prompts(body, encode)
    count = len(prompts)
    sampling = _per_prompt(body.get("sampling_params"), count, is_batch, "sampling_params")
    params = [SamplingParams.from_dict(sampling[i], f"prompt {i}") for i in range(count)]
    if len({p.n for p in params}) > 1:
        raise ValueError("The parallel_sample_num should be the same for all samples in sample params.")
    n = params[0].n
    is_batch = is_batch or n > 1
    for name in _PER_PROMPT_LOGPROB:
        if n > 1 and isinstance(body.get(name), list):
            raise ValueError(f"Cannot use list {name} with parallel_sample_num > 1")
    logprob = _per_prompt(body.get("return_logprob") or False, count, is_batch, "return_logprob")
    lp_start = _per_prompt(-1 if body.get("logprob_start_len") is None else body["logprob_start_len"], count,
                           is_batch, "logprob_start_len")
    routed = bool(body.get("return_routed_experts", False))
    re_start = body.get("routed_experts_start_len", 0)
    rids = _rids(body.get("rid"), count, n, is_batch)
    items: list[GenerateItem] = []
    for i, prompt in enumerate(prompts):
        where = f"prompt {i}"
        for _ in range(n):
            items.append(GenerateItem(
                rid=rids[len(items)], input_ids=prompt, params=params[i], return_logprob=bool(logprob[i]),
                logprob_start_len=_check_start(lp_start[i], -1, len(prompt), "logprob_start_len", where),
                return_routed_experts=routed,
                routed_experts_start_len=_check_start(re_start, 0, len(prompt), "routed_experts_start_len", where),
            ))
    return items, is_batch


def finish_length(length: int) -> dict[str, Any]:
    return {"type": "length", "length": length}


def finish_stop(matched: int) -> dict[str, Any]:
    return {"type": "stop", "matched": matched}


def finish_abort(message: str) -> dict[str, Any]:
    return {"type": "abort", "message": message}


def encode_routed_experts(routing: np.ndarray) -> str:
    """SGLang's encoding of a routing trace [rows, layers, topk]: base64 of flat row-major little-endian int32."""
    return base64.b64encode(np.ascontiguousarray(routing, dtype="<i4").tobytes()).decode("ascii")


def logprob_triples(logprobs: list[float | None], token_ids: list[int]) -> list[list[Any]]:
    """SGLang's ``[logprob, token_id, text]`` entries (text is null unless return_text_in_logprobs)."""
    return [[lp, tok, None] for lp, tok in zip(logprobs, token_ids)]


def response_dict(item: GenerateItem, output_ids: list[int], output_logprobs: list[float],
                  input_logprobs: list[float | None], routing: np.ndarray | None, finish_reason: dict[str, Any],
                  weight_version: str, latency_s: float, text: str | None = None,
                  num_retractions: int = 0) -> dict[str, Any]:
    """One non-streaming /generate result in SGLang's layout (``tokenizer_manager.py`` ``_handle_batch_output``).

    ``input_logprobs`` covers prompt tokens [logprob_start_len, P) (its first entry is None); ``routing`` is
    [P + N − 1 − routed_experts_start_len, layers, topk], or None (field omitted, as a server without
    --enable-return-routed-experts does); ``text`` None = no tokenizer (the field is omitted).
    """
    meta: dict[str, Any] = {
        "id": item.rid, "finish_reason": finish_reason, "prompt_tokens": len(item.input_ids),
        "weight_version": weight_version, "num_retractions": num_retractions,
        "completion_tokens": len(output_ids), "cached_tokens": 0, "reasoning_tokens": 0, "e2e_latency": latency_s,
    }
    if item.return_logprob:
        prompt_part = list(item.input_ids[item.logprob_start_len:]) if item.logprob_start_len >= 0 else []
        meta["input_token_logprobs"] = logprob_triples(input_logprobs, prompt_part)
        meta["output_token_logprobs"] = logprob_triples(output_logprobs, output_ids)
        meta["output_token_logprobs_length"] = len(output_ids)
    if routing is not None:
        meta["routed_experts"] = encode_routed_experts(routing)
    body: dict[str, Any] = {} if text is None else {"text": text}
    body.update({"output_ids": output_ids, "meta_info": meta})
    return body


def error_body(message: str) -> dict[str, Any]:
    """SGLang's error response for a ValueError in /generate (HTTP 400)."""
    return {"error": {"message": message}}
