"""Input checks of the numpy reference packer; csrc/packer.cpp raises the same messages in the same order.

Pass 1 checks the structure of every sample (type, ndim, dtype, contiguity, lengths, agreement with sample 0);
pass 2 checks values (token ids ≥ 0, loss mask in {0, 1}, rollout log-probs finite and ≤ 0). Each failure is a
ValueError "sample <id>: <field>: <what>".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vespo_megatron.packing.sample import Sample

ID_DTYPES = ("int32", "int64")
MASK_DTYPES = ("bool", "uint8")
LOGPROB_DTYPES = ("float32", "float64")
ROUTING_DTYPES = ("uint8", "uint16", "int32")


@dataclass(frozen=True)
class SampleSpec:
    """Lengths of one validated sample: prompt P, response R, rollout log-probs kept (≤ R) and given."""

    prompt_len: int
    response_len: int
    logprobs_kept: int
    logprobs_given: int


def _error(sid: int, field: str, what: str) -> ValueError:
    return ValueError(f"sample {sid}: {field}: {what}")


def _check_array(a: object, sid: int, field: str, ndim: int, dtypes: tuple[str, ...]) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise _error(sid, field, f"expected a numpy array, got {type(a).__name__}")
    if a.ndim != ndim:
        raise _error(sid, field, f"expected a {ndim}-D array, got {a.ndim}-D")
    if str(a.dtype) not in dtypes:
        raise _error(sid, field, f"dtype {a.dtype} not one of {', '.join(dtypes)}")
    if not a.flags.c_contiguous:
        raise _error(sid, field, "array is not C-contiguous")
    return a


def _check_presence(samples: Sequence[Sample], ids: np.ndarray, i: int, field: str) -> bool:
    here, first = getattr(samples[i], field) is not None, getattr(samples[0], field) is not None
    if here != first:
        state = "present while sample {} has none" if here else "missing while sample {} has one"
        raise _error(ids[i], field, state.format(ids[0]))
    return here


def _check_routing(samples: Sequence[Sample], ids: np.ndarray, i: int, tokens: int) -> None:
    sid, r = ids[i], _check_array(samples[i].routing, ids[i], "routing", 3, ROUTING_DTYPES)
    if i == 0:
        layers, topk = r.shape[1:]
        if layers < 1 or topk < 1:
            raise _error(sid, "routing", f"layers {layers} and topk {topk} must be >= 1")
        limit = int(np.iinfo(r.dtype).max) + 1
        if topk > limit:
            raise _error(sid, "routing", f"topk {topk} > {limit} distinct ids of {r.dtype}")
    else:
        r0 = samples[0].routing
        for name, here, there in (("dtype", r.dtype, r0.dtype), ("layers", r.shape[1], r0.shape[1]),
                                  ("topk", r.shape[2], r0.shape[2])):
            if here != there:
                raise _error(sid, "routing", f"{name} {here} differs from sample {ids[0]} ({there})")
    if r.shape[0] != tokens - 1:
        raise _error(sid, "routing", f"{r.shape[0]} rows for {tokens} tokens (expected {tokens - 1}: one per "
                                     "forward, none for the last token)")


def _check_structure(samples: Sequence[Sample], ids: np.ndarray, i: int, truncate: bool) -> SampleSpec:
    s, sid = samples[i], ids[i]
    prompt = _check_array(s.prompt, sid, "prompt", 1, ID_DTYPES)
    if prompt.size == 0:
        raise _error(sid, "prompt", "empty (the first token has no prediction)")
    response = _check_array(s.response, sid, "response", 1, ID_DTYPES)
    if s.loss_mask is not None:
        mask = _check_array(s.loss_mask, sid, "loss_mask", 1, MASK_DTYPES)
        if mask.size != response.size:
            raise _error(sid, "loss_mask", f"length {mask.size} != response length {response.size}")
    given = kept = 0
    if _check_presence(samples, ids, i, "rollout_logprobs"):
        given = _check_array(s.rollout_logprobs, sid, "rollout_logprobs", 1, LOGPROB_DTYPES).size
        if given > response.size and not truncate:
            raise _error(sid, "rollout_logprobs", f"{given} values for {response.size} response tokens "
                                                  "(pass truncate=True to drop the extra ones)")
        kept = min(given, response.size)
    if _check_presence(samples, ids, i, "routing"):
        _check_routing(samples, ids, i, prompt.size + response.size)
    return SampleSpec(int(prompt.size), int(response.size), kept, given)


def _first(bad: np.ndarray) -> int | None:
    return int(np.argmax(bad)) if bad.any() else None


def _check_values(s: Sample, sid: int) -> None:
    for field in ("prompt", "response"):
        j = _first(getattr(s, field) < 0)
        if j is not None:
            raise _error(sid, field, f"index {j} holds a negative token id")
    if s.loss_mask is not None and s.loss_mask.dtype == np.uint8:
        j = _first(s.loss_mask > 1)
        if j is not None:
            raise _error(sid, "loss_mask", f"index {j} is not 0 or 1")
    if s.rollout_logprobs is not None:
        lp = s.rollout_logprobs
        j = _first(~(lp <= 0) | (lp == -np.inf))
        if j is not None:
            what = "is NaN" if np.isnan(lp[j]) else "is -inf" if lp[j] < 0 else "is positive (log-probs are <= 0)"
            raise _error(sid, "rollout_logprobs", f"index {j} {what}")


def validate_samples(samples: Sequence[Sample], ids: np.ndarray, truncate: bool) -> list[SampleSpec]:
    """Check every sample (pass 1: structure, pass 2: values); return their lengths."""
    specs = [_check_structure(samples, ids, i, truncate) for i in range(len(samples))]
    for s, sid in zip(samples, ids.tolist()):
        _check_values(s, sid)
    return specs
