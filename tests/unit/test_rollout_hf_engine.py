"""The CPU rollout engine against a teacher-forced forward of the same HF model (independent of the engine's hooks)."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.megatron.model import moe_layer_pattern
from vespo_megatron.rollout.hf_engine import HFEngine

PROMPTS = [[3, 17, 99, 4, 250, 8], [42], [7, 7, 7, 1, 2]]


def _model(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides)).eval()


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def fp32_model(request) -> torch.nn.Module:
    # Qwen3 with a dense layer 1: its rows must stay zero.
    overrides = {"mlp_only_layers": [1]} if request.param == "qwen3_moe" else {}
    return _model(request.param, **overrides)


def _decode(meta: dict, layers: int, topk: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(meta["routed_experts"]), "<i4").reshape(-1, layers, topk)


def _teacher_forced(model: torch.nn.Module, tokens: list[int], temperature: float) -> tuple[torch.Tensor, np.ndarray]:
    """Log-probs [T−1] of tokens 1.. at temperature T, and top-k ids [T, layers, k] from the router logits."""
    cfg = model.config
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), output_router_logits=True)
    logp = torch.log_softmax(out.logits[0, :-1].float() / temperature, -1).gather(-1, torch.tensor(tokens[1:])[:, None])
    routing = np.zeros((len(tokens), cfg.num_hidden_layers, cfg.num_experts_per_tok), np.int32)
    moe_layers = [i for i, moe in enumerate(moe_layer_pattern(cfg)) if moe]
    for layer, logits in zip(moe_layers, out.router_logits, strict=True):
        routing[:, layer] = torch.topk(torch.softmax(logits.float(), -1), cfg.num_experts_per_tok).indices.numpy()
    return logp[:, 0], routing


def test_fp32_logprobs_and_routing_equal_a_teacher_forced_forward(fp32_model):
    engine = HFEngine.from_model(fp32_model, dtype="fp32")
    cfg = fp32_model.config
    outs = engine.generate(PROMPTS, {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "sampling_seed": 5,
                                     "ignore_eos": True}, return_logprob=True, return_routed_experts=True)
    for prompt, out in zip(PROMPTS, outs):
        response = out["output_ids"]
        meta = out["meta_info"]
        assert len(response) == 12 and meta["finish_reason"] == {"type": "length", "length": 12}
        ref_logp, ref_routing = _teacher_forced(fp32_model, prompt + response, 0.8)
        got = torch.tensor([entry[0] for entry in meta["output_token_logprobs"]])
        assert [entry[1] for entry in meta["output_token_logprobs"]] == response
        torch.testing.assert_close(got, ref_logp[len(prompt) - 1:], atol=2e-5, rtol=0)
        routing = _decode(meta, cfg.num_hidden_layers, cfg.num_experts_per_tok)
        assert routing.shape[0] == len(prompt) + len(response) - 1  # the last sampled token is never forwarded
        np.testing.assert_array_equal(routing, ref_routing[:-1])
        for layer, moe in enumerate(moe_layer_pattern(cfg)):
            assert (routing[:, layer] == 0).all() != bool(moe), f"layer {layer}"


def test_bf16_engine_stays_close_to_fp32_forward(fp32_model):
    engine = HFEngine.from_model(fp32_model, dtype="bf16")
    assert next(fp32_model.parameters()).dtype == torch.float32  # the caller's model is untouched
    out = engine.generate(PROMPTS[0], {"max_new_tokens": 16, "sampling_seed": 1, "ignore_eos": True},
                          return_logprob=True)
    got = torch.tensor([entry[0] for entry in out["meta_info"]["output_token_logprobs"]])
    ref, _ = _teacher_forced(fp32_model, PROMPTS[0] + out["output_ids"], 1.0)
    delta = (got - ref[len(PROMPTS[0]) - 1:]).abs()
    assert delta.max() > 0  # bf16 is not fp32 ...
    assert delta.mean() < 0.1  # ... but it is the same model (hf-engine.md §4: mean |Δ| ~0.07-0.13 at init 0.2)


def test_same_seed_same_sample_and_different_seed_differs():
    engine = HFEngine.from_model(_model("qwen3_moe"), dtype="bf16")
    params = {"max_new_tokens": 10, "ignore_eos": True}

    def run(seed: int) -> list[int]:
        return engine.generate(PROMPTS[2], {**params, "sampling_seed": seed})["output_ids"]

    first = run(11)
    engine.generate(PROMPTS, {**params, "sampling_seed": 3})  # other traffic in between changes nothing
    assert run(11) == first
    assert run(12) != first


def test_stop_tokens_min_new_tokens_and_eos():
    model = _model("mixtral")  # eos_token_id = 2
    engine = HFEngine.from_model(model, dtype="fp32")
    greedy = engine.generate(PROMPTS[0], {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True})
    first, second = greedy["output_ids"][:2]
    stopped = engine.generate(PROMPTS[0], {"max_new_tokens": 6, "temperature": 0.0, "stop_token_ids": [second],
                                           "ignore_eos": True}, return_logprob=True, return_routed_experts=True)
    assert stopped["output_ids"] == [first, second]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": second}
    assert _decode(stopped["meta_info"], 4, 2).shape[0] == len(PROMPTS[0]) + 1
    # a stop token banned before min_new_tokens is not sampled, and its mass leaves the reported log-prob
    late = engine.generate(PROMPTS[0], {"max_new_tokens": 6, "temperature": 0.0, "stop_token_ids": [first],
                                        "min_new_tokens": 1, "ignore_eos": True}, return_logprob=True)
    assert late["output_ids"][0] != first
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1].float()
    logits[first] = float("-inf")
    expected = torch.log_softmax(logits, -1)[late["output_ids"][0]]
    assert late["meta_info"]["output_token_logprobs"][0][0] == pytest.approx(float(expected), abs=2e-5)
    # the config's eos stops generation unless ignore_eos
    model.config.eos_token_id = first
    eos_engine = HFEngine.from_model(model, dtype="fp32")
    params = {"max_new_tokens": 6, "temperature": 0.0}
    assert eos_engine.generate(PROMPTS[0], params)["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    assert len(eos_engine.generate(PROMPTS[0], {**params, "ignore_eos": True})["output_ids"]) == 6


def test_prompt_logprobs_scoring_and_routing_start_len():
    model = _model("qwen3_moe")
    engine = HFEngine.from_model(model, dtype="fp32")
    tokens = PROMPTS[0]
    scored = engine.generate(tokens, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0,
                             return_routed_experts=True)
    meta = scored["meta_info"]
    assert scored["output_ids"] == [] and meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["input_token_logprobs"][0] == [None, tokens[0], None]
    ref, ref_routing = _teacher_forced(model, tokens, 1.0)
    torch.testing.assert_close(torch.tensor([e[0] for e in meta["input_token_logprobs"][1:]]), ref, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(_decode(meta, 4, 2), ref_routing[:-1])
    tail = engine.generate(tokens, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=4,
                           return_routed_experts=True, routed_experts_start_len=2)["meta_info"]
    assert [e[1] for e in tail["input_token_logprobs"]] == tokens[4:]
    # as the release: None at position logprob_start_len, then the log-probs of the later prompt tokens
    assert tail["input_token_logprobs"][0][0] is None
    torch.testing.assert_close(torch.tensor([e[0] for e in tail["input_token_logprobs"][1:]]), ref[4:], atol=2e-5,
                               rtol=0)
    np.testing.assert_array_equal(_decode(tail, 4, 2), ref_routing[2:-1])


@pytest.mark.parametrize("request_kwargs, message", [
    ({"input_ids": [1, 300]}, "token id 300 >= vocab size 256"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 600}}, "exceeds the context length 512"),
    ({"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [999]}}, "stop_token_ids [999]"),
    ({"prompt": "hello"}, "needs a tokenizer"),
])
def test_bad_requests_name_the_request(request_kwargs, message):
    engine = HFEngine.from_model(_model("qwen3_moe"), dtype="fp32")
    with pytest.raises(ValueError) as err:
        engine.generate(rid="r7", **request_kwargs)
    assert message in str(err.value)
    assert "prompt" in request_kwargs or str(err.value).startswith("request r7: ")


def test_routing_omitted_without_the_server_flag():
    # the release answers a routed-experts request to a server without --enable-return-routed-experts without the
    # field (tokenizer_manager.py:2603-2609 sets it only when captured), not with an error
    engine = HFEngine.from_model(_model("qwen3_moe"), dtype="fp32", enable_return_routed_experts=False)
    out = engine.generate([1, 2], {"max_new_tokens": 2}, rid="r1", return_routed_experts=True)
    assert "routed_experts" not in out["meta_info"] and len(out["output_ids"]) == 2


def test_seeds_are_ignored_without_deterministic_inference():
    engine = HFEngine.from_model(_model("qwen3_moe"), dtype="fp32", enable_deterministic_inference=False)
    params = {"max_new_tokens": 12, "sampling_seed": 4, "ignore_eos": True}
    runs = {tuple(engine.generate(PROMPTS[0], params)["output_ids"]) for _ in range(3)}
    assert len(runs) > 1  # as SGLang without --enable-deterministic-inference: the seed does not fix the sample


def test_text_in_and_out_with_a_tokenizer():
    # with a tokenizer the release accepts text and answers a `text` field (tokenizer_manager.py:2667-2669)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    engine = HFEngine.from_model(_model("qwen3_moe"), dtype="fp32", tokenizer=tokenizer)
    out = engine.generate(prompt="t3 t17 t99", sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    assert out["meta_info"]["prompt_tokens"] == 3
    assert out["text"] == tokenizer.decode(out["output_ids"], skip_special_tokens=True) and out["text"]
    assert engine.get_server_info()["skip_tokenizer_init"] is False
    assert "text" not in HFEngine.from_model(_model("qwen3_moe"), dtype="fp32").generate([1, 2], {"max_new_tokens": 1})
