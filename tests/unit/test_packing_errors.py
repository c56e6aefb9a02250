"""Every bad input is a ValueError naming the sample and the field, with the same message in C++ and numpy."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from vespo_megatron.packing import Sample, native, reference

IDS = [10, 11, 12]  # the bad sample is the second one: "sample 11"


def good(routing_dtype=np.uint8) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for p, r in ((3, 2), (2, 4), (1, 1)):
        out.append(Sample(
            prompt=rng.integers(0, 50, p),
            response=rng.integers(0, 50, r),
            rollout_logprobs=-rng.random(r),
            loss_mask=np.ones(r, np.uint8),
            routing=rng.integers(0, 8, (p + r - 1, 2, 2)).astype(routing_dtype),
            advantage=1.0,
        ))
    return out


def with_lp(values):
    return {"rollout_logprobs": np.array(values)}


BAD_SECOND_SAMPLE = {
    "prompt list": ({"prompt": [1, 2]}, "sample 11: prompt: expected a numpy array, got list"),
    "prompt empty": ({"prompt": np.array([], np.int64)}, "sample 11: prompt: empty"),
    "prompt float": ({"prompt": np.array([1.0, 2.0])}, "sample 11: prompt: dtype float64 not one of int32, int64"),
    "prompt 2-D": ({"prompt": np.ones((2, 1), np.int64)}, "sample 11: prompt: expected a 1-D array, got 2-D"),
    "prompt negative id": ({"prompt": np.array([3, -4])}, "sample 11: prompt: index 1 holds a negative token id"),
    "response strided": ({"response": np.arange(8)[::2]}, "sample 11: response: array is not C-contiguous"),
    "response uint64": ({"response": np.arange(4, dtype=np.uint64)}, "sample 11: response: dtype uint64"),
    "mask length": ({"loss_mask": np.ones(3, np.uint8)}, "sample 11: loss_mask: length 3 != response length 4"),
    "mask value": ({"loss_mask": np.array([1, 2, 0, 1], np.uint8)}, "sample 11: loss_mask: index 1 is not 0 or 1"),
    "mask dtype": ({"loss_mask": np.ones(4, np.int64)}, "sample 11: loss_mask: dtype int64 not one of bool, uint8"),
    "lp too long": (with_lp([-1.0] * 5), "sample 11: rollout_logprobs: 5 values for 4 response tokens"),
    "lp nan": (with_lp([-1.0, np.nan]), "sample 11: rollout_logprobs: index 1 is NaN"),
    "lp positive": (with_lp([-1.0, -2.0, 0.5]), "sample 11: rollout_logprobs: index 2 is positive"),
    "lp -inf": (with_lp([-np.inf]), "sample 11: rollout_logprobs: index 0 is -inf"),
    "lp float16": ({"rollout_logprobs": np.zeros(4, np.float16)}, "sample 11: rollout_logprobs: dtype float16"),
    "lp missing": ({"rollout_logprobs": None}, "sample 11: rollout_logprobs: missing while sample 10 has one"),
    "routing rows": ({"routing": np.zeros((6, 2, 2), np.uint8)},
                     "sample 11: routing: 6 rows for 6 tokens (expected 5"),
    "routing dtype": ({"routing": np.zeros((5, 2, 2), np.int64)}, "sample 11: routing: dtype int64 not one of"),
    "routing dtype differs": ({"routing": np.zeros((5, 2, 2), np.uint16)},
                              "sample 11: routing: dtype uint16 differs from sample 10 (uint8)"),
    "routing layers": ({"routing": np.zeros((5, 3, 2), np.uint8)},
                       "sample 11: routing: layers 3 differs from sample 10 (2)"),
    "routing topk": ({"routing": np.zeros((5, 2, 1), np.uint8)}, "sample 11: routing: topk 1 differs from sample 10"),
    "routing 2-D": ({"routing": np.zeros((5, 4), np.uint8)}, "sample 11: routing: expected a 3-D array, got 2-D"),
    "routing strided": ({"routing": np.zeros((2, 2, 5), np.uint8).T}, "sample 11: routing: array is not C-contiguous"),
    "routing missing": ({"routing": None}, "sample 11: routing: missing while sample 10 has one"),
    "advantage nan": ({"advantage": float("nan")}, "sample 11: advantage: not finite"),
    "advantage missing": ({"advantage": None}, "sample 11: advantage: missing while other samples have one"),
}


def assert_same_error(samples, **kwargs) -> str:
    messages = []
    for impl in (reference, native):
        with pytest.raises(ValueError) as err:
            impl.pack(samples, **kwargs)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    return messages[0]


@pytest.mark.parametrize("change, message", BAD_SECOND_SAMPLE.values(), ids=BAD_SECOND_SAMPLE.keys())
def test_bad_sample_field(change, message):
    samples = good()
    samples[1] = replace(samples[1], **change)
    assert assert_same_error(samples, sample_ids=IDS, cp=2, sp=2).startswith(message)


def test_first_sample_defines_presence():
    samples = good()
    samples[0] = replace(samples[0], routing=None)
    assert assert_same_error(samples, sample_ids=IDS) == "sample 11: routing: present while sample 10 has none"


@pytest.mark.parametrize(
    "routing, message",
    [
        (np.zeros((4, 0, 2), np.uint8), "sample 10: routing: layers 0 and topk 2 must be >= 1"),
        (np.zeros((4, 1, 257), np.uint8), "sample 10: routing: topk 257 > 256 distinct ids of uint8"),
    ],
)
def test_routing_shape_of_first_sample(routing, message):
    samples = good()
    samples[0] = replace(samples[0], routing=routing)
    assert assert_same_error(samples, sample_ids=IDS) == message


def test_truncate_flag_drops_extra_logprobs_and_reports_them():
    samples = good()
    samples[1] = replace(samples[1], rollout_logprobs=-np.arange(1.0, 7.0))  # 6 values, 4 response tokens
    assert "pass truncate=True" in assert_same_error(samples, sample_ids=IDS)
    for impl in (reference, native):
        b = impl.pack(samples, truncate=True)
        assert b.stats.logprobs_truncated == 2 and b.stats.samples_truncated == 1
        np.testing.assert_array_equal(b.rollout_logprobs[0][b.seq_index[0] == 1][2:], -np.arange(1.0, 5.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"cp": 0}, "cp must be a positive integer"), ({"sp": 2.0}, "sp must be a positive integer"),
     ({"tail_align": -8}, "tail_align must be a positive integer"),
     ({"sample_ids": [1, 2]}, "sample_ids: expected 3 ids")],
)
def test_bad_call_arguments(kwargs, message):
    assert re.match(message, assert_same_error(good(), **kwargs))


def test_bad_unpack_values():
    for impl in (reference, native):
        b = impl.pack(good(), cp=2, sp=2)
        with pytest.raises(ValueError, match=r"values: expected shape \(2, 10, \.\.\.\)"):
            impl.unpack(b, np.zeros((1, 10)))
        with pytest.raises(ValueError, match="values: array is not C-contiguous"):
            impl.unpack(b, np.zeros((10, 2)).T)
