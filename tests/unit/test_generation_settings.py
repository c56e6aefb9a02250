"""Generation settings: stop ids from the model's files (no constants), SGLang sampling params, bad values named."""
import json

import pytest

from vespo_megatron.data import eos_token_ids
from vespo_megatron.data.arithmetic import build_tokenizer
from vespo_megatron.rollout.generation import GenerationSettings
from vespo_megatron.rollout.sampling import SamplingParams


def test_eos_from_generation_config_config_and_tokenizer(tmp_path):
    tok = build_tokenizer(tmp_path)
    assert eos_token_ids(tmp_path, tok) == [tok.eos_token_id] == [1]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert eos_token_ids(tmp_path, tok) == [1, 7, 9, 11]
    assert eos_token_ids(tmp_path) == [7, 9, 11]


def test_sampling_params_sampled_and_greedy():
    gen = GenerationSettings(max_response_len=64, temperature=0.7, top_p=0.9, top_k=20, stop=("</answer>",),
                             stop_token_ids=(5, 1)).validate()
    assert gen.sampling_params([1, 3]) == {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                                           "stop_token_ids": [1, 3, 5], "stop": ["</answer>"]}
    greedy = GenerationSettings(max_response_len=8).sampling_params([2], greedy=True)
    assert greedy == {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "stop_token_ids": [2]}
    assert SamplingParams.from_dict(greedy, "req").greedy  # the CPU engine reads them as greedy


@pytest.mark.parametrize("kwargs, flag", [({"max_response_len": 0}, "--rollout-max-response-len"),
                                          ({"temperature": -1.0}, "--rollout-temperature"),
                                          ({"top_p": 0.0}, "--rollout-top-p"), ({"top_k": 0}, "--rollout-top-k"),
                                          ({"stop_token_ids": (-1,)}, "--rollout-stop-token-ids"),
                                          ({"stop": ("",)}, "--rollout-stop")])
def test_bad_values_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        GenerationSettings(**kwargs).validate()
