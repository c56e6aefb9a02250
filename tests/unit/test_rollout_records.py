"""Parsing SGLang /generate results into rollout records; every malformed field is a clear error naming the request."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from vespo_megatron.rollout.records import RolloutResponseError, record_from_response
from vespo_megatron.routing.trace import TraceSpec

SPEC = TraceSpec(num_hf_layers=3, moe_layers=(0, 2), num_experts=8, topk=2)
PROMPT = [11, 12, 13]
TRACE = np.arange(4 * 3 * 2, dtype=np.int32).reshape(4, 3, 2) % 8  # rows = 3 + 2 - 1
TRACE[:, 1] = 0  # layer 1 is dense


def _b64(array: np.ndarray, dtype: str = "<i4") -> str:
    return base64.b64encode(array.astype(dtype).tobytes()).decode()


def _response(**meta_overrides) -> dict:
    meta = {"id": "r", "finish_reason": {"type": "stop", "matched": 6}, "prompt_tokens": 3, "completion_tokens": 2,
            "weight_version": "w3", "output_token_logprobs": [[-0.25, 5, None], [-1.5, 6, None]],
            "routed_experts": _b64(TRACE)}
    meta.update(meta_overrides)
    return {"output_ids": [5, 6], "meta_info": meta}


def test_valid_response_becomes_a_record():
    record = record_from_response(_response(), "r", PROMPT, SPEC)
    np.testing.assert_array_equal(record.prompt_ids, PROMPT)
    np.testing.assert_array_equal(record.response_ids, [5, 6])
    np.testing.assert_array_equal(record.logprobs, np.float32([-0.25, -1.5]))
    np.testing.assert_array_equal(record.routing, TRACE)
    assert record.routing.dtype == np.int32
    assert record.finish_reason == {"type": "stop", "matched": 6} and record.weight_version == "w3"
    assert record_from_response(_response(), "r", PROMPT).routing is None  # not asked: not decoded


def test_start_len_narrow_dtype_and_old_servers_without_output_ids():
    narrow = record_from_response(_response(routed_experts=_b64(TRACE[1:], "u1"), routed_experts_dtype="uint8"),
                                  "r", PROMPT, SPEC, routed_experts_start_len=1)
    np.testing.assert_array_equal(narrow.routing, TRACE[1:])
    legacy = _response()
    del legacy["output_ids"]
    np.testing.assert_array_equal(record_from_response(legacy, "r", PROMPT).response_ids, [5, 6])


@pytest.mark.parametrize("overrides, message", [
    ({"routed_experts": None}, "request r: meta_info has no routed_experts, but routing replay needs it"),
    ({"routed_experts": _b64(TRACE)[:-3]}, "request r: routed_experts of sample r, all layers, all rows: malformed"),
    ({"routed_experts": _b64(TRACE)[:-8]}, "request r: routed_experts of sample r, all layers, all rows: wrong dtype"),
    ({"routed_experts": _b64(TRACE[:3])}, "row 3: trace for a different sample length"),
    ({"routed_experts": _b64(np.where(TRACE == 6, 8, TRACE))}, "sample r, layer 0, row 1: id >= num_experts 8"),
    ({"routed_experts": _b64(np.where(TRACE == 5, 4, TRACE))}, "sample r, layer 2, row 0: duplicate ids"),
    ({"routed_experts": _b64(TRACE * np.array([1, 1, 0])[:, None])}, "layer 2, all rows: all ids are 0"),
    ({"output_token_logprobs": [[-0.25, 5, None]]}, "request r: 1 output log-probs for 2 output tokens"),
    ({"output_token_logprobs": None}, "no output_token_logprobs"),
    ({"output_token_logprobs": [[-0.25, 5, None], [0.5, 6, None]]}, "log-prob 0.5 at position 1 is not finite"),
    ({"output_token_logprobs": [[-0.25, 5, None], [float("nan"), 6, None]]}, "log-prob nan at position 1"),
    ({"output_token_logprobs": [[-0.25, 5, None], [-1.0, 7, None]]}, "output_token_logprobs[1]="),
    ({"finish_reason": {"type": "abort", "message": "oom"}}, "request r: did not finish"),
    ({"finish_reason": None}, "did not finish (finish_reason=None)"),
])
def test_malformed_fields_name_the_request(overrides, message):
    with pytest.raises(RolloutResponseError) as err:
        record_from_response(_response(**overrides), "r", PROMPT, SPEC)
    assert message in str(err.value)


def test_non_object_response():
    with pytest.raises(RolloutResponseError, match="request q: response is not an object with meta_info"):
        record_from_response(["oops"], "q", PROMPT)
