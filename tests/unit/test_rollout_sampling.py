"""Sampling filters and reported log-probs against hand-computed values and properties."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vespo_megatron.rollout.sampling import SamplingParams, filtered_probs, sample_token, token_logprobs

PROBS = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
LOGITS = PROBS.log()


def _filtered(**params) -> torch.Tensor:
    return filtered_probs(token_logprobs(LOGITS, SamplingParams(**params)), SamplingParams(**params))


def test_top_k_top_p_min_p_by_hand():
    # top-k 2 keeps {0.4, 0.3}
    torch.testing.assert_close(_filtered(top_k=2), torch.tensor([0, 0.4, 0, 0.3, 0]) / 0.7)
    # top-p 0.75: sorted 0.4, 0.3 (mass before 0.4 < 0.75), 0.15 (mass before 0.7 < 0.75), then 0.85 >= 0.75 stops
    torch.testing.assert_close(_filtered(top_p=0.75), torch.tensor([0, 0.4, 0, 0.3, 0.15]) / 0.85)
    # top-p exactly reached by the first two: the third is not kept
    torch.testing.assert_close(_filtered(top_p=0.7), torch.tensor([0, 0.4, 0, 0.3, 0]) / 0.7, atol=1e-6, rtol=0)
    # min-p 0.5: keep p >= 0.2
    torch.testing.assert_close(_filtered(min_p=0.5), torch.tensor([0, 0.4, 0, 0.3, 0]) / 0.7)


def test_reported_logprob_is_temperature_scaled_before_filtering():
    params = SamplingParams(temperature=0.5, top_k=1)
    token, logprob = sample_token(LOGITS, params, torch.Generator().manual_seed(0))
    assert token == 1  # top-k 1 leaves only the most likely token
    scaled = PROBS ** 2 / (PROBS ** 2).sum()  # softmax(log p / 0.5) = p² / Σ p²
    assert logprob == pytest.approx(math.log(scaled[1]), abs=1e-6)  # not log(1): no top-k renormalisation


def test_greedy_reports_untempered_logprob_and_bans_apply():
    params = SamplingParams(temperature=0.0)
    assert sample_token(LOGITS, params, torch.Generator()) == (1, pytest.approx(math.log(0.4), abs=1e-6))
    token, logprob = sample_token(LOGITS, params, torch.Generator(), banned=[1])
    assert token == 3 and logprob == pytest.approx(math.log(0.3 / 0.6), abs=1e-6)


def test_sampling_frequencies_follow_the_filtered_distribution():
    params = SamplingParams(top_p=0.75)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[sample_token(LOGITS, params, generator)[0]] += 1
    torch.testing.assert_close(counts / 4000, torch.tensor([0, 0.4, 0, 0.3, 0.15]) / 0.85, atol=0.03, rtol=0)


@settings(max_examples=40, deadline=None)
@given(logits=st.lists(st.floats(-5, 5), min_size=2, max_size=12), top_p=st.floats(0.05, 1.0),
       top_k=st.integers(1, 12), temperature=st.floats(0.1, 2.0))
def test_filtered_distribution_is_a_top_prefix(logits, top_p, top_k, temperature):
    params = SamplingParams(top_p=top_p, top_k=top_k, temperature=temperature)
    logprobs = token_logprobs(torch.tensor(logits), params)
    probs = filtered_probs(logprobs, params)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    kept = probs > 0
    assert kept[logprobs.argmax()]  # the most likely token always survives
    if (~kept).any():  # the kept tokens are the most likely ones
        assert logprobs[kept].min() >= logprobs[~kept].max()


@pytest.mark.parametrize("raw, message", [
    ({"stop": ["\n"]}, "sampling_params.stop=['\\n'] is not supported by this engine (string stops need a tokenizer"),
    ({"seed": 3}, "unknown sampling_params field 'seed'"),
    ({"repetition_penalty": 1.2}, "sampling_params.repetition_penalty=1.2 is not supported"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0"),
])
def test_bad_sampling_params_name_the_prompt_and_field(raw, message):
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict(raw, "prompt 3")
    assert str(err.value).startswith("prompt 3: ") and message in str(err.value)


def test_null_fields_and_text_only_fields_take_defaults():
    params = SamplingParams.from_dict({"temperature": None, "skip_special_tokens": False, "stop": None,
                                       "stop_token_ids": [5, 6]}, "prompt 0")
    assert params == SamplingParams(stop_token_ids=(5, 6))
