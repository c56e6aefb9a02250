"""SGLang /generate request splitting and response layout (sglang-protocol.md §1)."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from vespo_megatron.rollout.protocol import (
    encode_routed_experts, finish_length, parse_generate_request, response_dict,
)


def test_single_request_defaults():
    items, is_batch = parse_generate_request({"input_ids": [1, 2, 3], "rid": "a"})
    assert not is_batch and len(items) == 1
    item = items[0]
    assert (item.rid, item.input_ids, item.params.max_new_tokens, item.params.temperature) == ("a", (1, 2, 3), 128, 1.0)
    assert (item.return_logprob, item.logprob_start_len, item.return_routed_experts) == (False, -1, False)


def test_batch_and_n_are_prompt_major_with_sglang_rids():
    items, is_batch = parse_generate_request({"input_ids": [[1], [2, 3]], "rid": "x",
                                              "sampling_params": {"n": 2, "temperature": 0.5}})
    assert is_batch  # n > 1: every sample a fresh uuid (the release's regenerate_rid), prompt-major
    assert [i.input_ids for i in items] == [(1,), (1,), (2, 3), (2, 3)]
    assert len({i.rid for i in items}) == 4 and all(len(i.rid) == 32 and "x" not in i.rid for i in items)
    items, _ = parse_generate_request({"input_ids": [[1], [2, 3]], "rid": "x"})
    assert [i.rid for i in items] == ["x_0", "x_1"]  # a string rid of a batch: "{rid}_{i}"
    items, _ = parse_generate_request({"input_ids": [[1], [2]], "rid": ["p", "q"],
                                       "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}]})
    assert [(i.rid, i.params.max_new_tokens) for i in items] == [("p", 1), ("q", 2)]
    items, is_batch = parse_generate_request({"input_ids": [5], "sampling_params": {"n": 3}})
    assert is_batch and len({i.rid for i in items}) == 3  # generated uuids


@pytest.mark.parametrize("body, message", [
    ({"text": "hi"}, "text input needs a tokenizer"),
    ({"input_ids": [1], "text": "hi"}, "give exactly one of text, input_ids or input_embeds"),
    ({}, "give exactly one of"),
    ({"input_ids": []}, "must be a non-empty list"),
    ({"input_ids": [[1], []]}, "input_ids[1] must be a non-empty list"),
    ({"input_ids": [1, -2]}, "input_ids[0] must hold non-negative int"),
    ({"input_ids": [[1], [2]], "rid": ["a"]}, "rid has 1 entries for 2 prompts"),
    ({"input_ids": [[1], [2]], "rid": ["a", "a"]}, "duplicate rid 'a'"),
    ({"input_ids": [[1], [2]], "sampling_params": [{"n": 2}, {"n": 3}]}, "parallel_sample_num should be the same"),
    ({"input_ids": [[1], [2]], "return_logprob": [True, False], "sampling_params": {"n": 2}},
     "Cannot use list return_logprob with parallel_sample_num > 1"),
    ({"input_ids": [1], "stream": True}, "field 'stream' is not supported"),
    ({"input_ids": [1], "top_logprobs_num": 5}, "top_logprobs_num"),
    ({"input_ids": [1], "lora_path": "x"}, "field 'lora_path' is not supported"),
    ({"input_ids": [1], "sampling_params": {"seed": 3}}, "unknown sampling_params field 'seed'"),
    ({"input_ids": [1, 2], "routed_experts_start_len": 3}, "prompt 0: routed_experts_start_len=3 must be an int in [0"),
    ({"input_ids": [1, 2], "logprob_start_len": -2}, "logprob_start_len=-2"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}, {"top_k": 0}]}, "prompt 1: sampling_params: top_k"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_requests_are_rejected_naming_the_field(body, message):
    with pytest.raises(ValueError) as err:
        parse_generate_request(body)
    assert message in str(err.value)


def test_unknown_top_level_fields_are_ignored_as_the_release_does():
    items, _ = parse_generate_request({"input_ids": [1], "lora_path": None, "return_hidden_states": False,
                                       "return_text_in_logprobs": True, "no_such_field": {"x": 1}})
    assert len(items) == 1


def test_routed_experts_encoding_is_flat_little_endian_int32():
    trace = np.arange(2 * 3 * 2, dtype=np.int64).reshape(2, 3, 2)
    raw = base64.b64decode(encode_routed_experts(trace))
    assert raw[:8] == bytes([0, 0, 0, 0, 1, 0, 0, 0])  # row-major, 4 bytes each, little-endian
    np.testing.assert_array_equal(np.frombuffer(raw, "<i4").reshape(2, 3, 2), trace)


def test_response_layout():
    (item,), _ = parse_generate_request({"input_ids": [4, 5, 6], "rid": "r", "return_logprob": True,
                                         "logprob_start_len": 1, "return_routed_experts": True})
    routing = np.zeros((4, 2, 2), np.int32)
    out = response_dict(item, [9, 8], [-0.5, -1.5], [-2.0, -3.0], routing, finish_length(2), "v1", 0.25)
    assert out["output_ids"] == [9, 8]
    meta = out["meta_info"]
    assert {k: meta[k] for k in ("id", "prompt_tokens", "completion_tokens", "weight_version", "e2e_latency")} == {
        "id": "r", "prompt_tokens": 3, "completion_tokens": 2, "weight_version": "v1", "e2e_latency": 0.25}
    assert meta["output_token_logprobs"] == [[-0.5, 9, None], [-1.5, 8, None]]
    assert meta["input_token_logprobs"] == [[-2.0, 5, None], [-3.0, 6, None]]
    assert "text" not in out  # no tokenizer: as --skip-tokenizer-init
    assert response_dict(item, [9], [-0.5], [], None, finish_length(1), "v1", 0.0, text="ab")["text"] == "ab"
    assert meta["finish_reason"] == {"type": "length", "length": 2}
    assert len(base64.b64decode(meta["routed_experts"])) == 4 * 2 * 2 * 4
    (plain,), _ = parse_generate_request({"input_ids": [4]})
    assert set(response_dict(plain, [1], [-1.0], [], None, finish_length(1), "v", 0.0)["meta_info"]) == {
        "id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency", "weight_version",
        "num_retractions", "reasoning_tokens"}
