"""Rewards: math (math-verify) and dapo on hand cases, exact, the synthetic task, custom loading errors, batch
scoring (batched, async, errors named or zeroed)."""
import asyncio
import threading

import numpy as np
import pytest

from vespo_megatron.rewards import (REWARDS, Reward, RewardError, RewardSample, get_reward, load_custom_reward,
                                    score_samples)
from vespo_megatron.rewards.math import normalize_answer
from vespo_megatron.rewards.synthetic import repeat_reward


def _s(response, label=None, rid="r0", **kw):
    return RewardSample(rid=rid, prompt="", response=response, prompt_ids=kw.get("prompt_ids", []),
                        response_ids=kw.get("response_ids", []), label=label, metadata=kw.get("metadata", {}))


MATH_CASES = [
    # (response, label, expected)  equivalent forms
    (r"So the answer is \boxed{42}.", "42", 1.0),
    (r"\boxed{42}", r"\boxed{42}", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", 1.0),
    (r"$\frac{2}{4}$", "1/2", 1.0),
    (r"\boxed{42.0}", "42", 1.0),
    (r"\boxed{x = 2}", "2", 1.0),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    (r"\boxed{\{2,1\}}", r"\{1,2\}", 1.0),
    (r"\boxed{3!}", "6", 1.0),
    (r"\boxed{-3}", "-3", 1.0),
    (r"\boxed{\pi}", r"\pi", 1.0),
    (r"\boxed{\text{42}}", "42", 1.0),
    (r"First \boxed{41}, no wait: \boxed{42}", "42", 1.0),  # the last boxed answer counts
    (r"The answer is $\frac{4}{2}$.", "2", 1.0),  # no boxed answer, a final LaTeX expression
    (r"The answer is 42", "42", 1.0),  # no boxed answer, a plain final number
    # wrong answers
    (r"\boxed{41}", "42", 0.0),
    (r"\boxed{42} wait no \boxed{43}", "42", 0.0),
    (r"\boxed{3.14159}", r"\pi", 0.0),
    (r"x = 2 is wrong; \boxed{3}", "2", 0.0),
    (r"\boxed{-1/2}", r"\frac12", 0.0),
    # no answer at all
    ("I do not know", "42", 0.0),
    ("", "42", 0.0),
    # malformed LaTeX
    (r"\boxed{4", "42", 0.0),
    (r"\boxed{\frac{}{}}", "3", 0.0),
]


@pytest.mark.parametrize("response, label, expected", MATH_CASES)
def test_math_reward_hand_cases(response, label, expected):
    assert REWARDS["math"].fn(_s(response, label)) == expected


def test_math_reward_in_a_worker_thread_and_bad_label():
    out = []
    thread = threading.Thread(target=lambda: out.append(REWARDS["math"].fn(_s(r"\boxed{7}", "7"))))
    thread.start()
    thread.join()
    assert out == [1.0]  # math-verify's SIGALRM time limit is off outside the main thread
    with pytest.raises(RewardError, match="reward 'math' on sample r0 raised ValueError: label '}{' is not"):
        score_samples(REWARDS["math"], [_s(r"\boxed{1}", "}{")])


DAPO_CASES = [
    ("Reasoning...\nAnswer: 34", "34", 1.0),
    ("answer: $\\frac12$", "\\frac{1}{2}", 1.0),
    ("Answer: 1,000", "1000", 1.0),
    ("Answer: 90^\\circ", "90", 1.0),
    ("Answer: \\boxed{7}.", "7", 1.0),
    ("Answer: 3\nAnswer: 5", "5", 1.0),  # the last one counts
    ("Answer: 33", "34", -1.0),
    ("The answer is \\boxed{34}", "34", -1.0),  # not the DAPO format
]


@pytest.mark.parametrize("response, label, expected", DAPO_CASES)
def test_dapo_reward_hand_cases(response, label, expected):
    out = REWARDS["dapo"].fn(_s(response, label))
    assert out == {"score": expected, "acc": float(expected > 0)}


def test_normalize_answer_hand_values():
    assert normalize_answer(" x = \\dfrac{3}{4}. ") == "\\frac{3}{4}"
    assert normalize_answer("\\text{5 dollars}") == "5"
    assert normalize_answer("\\sqrt2") == "\\sqrt{2}"


def test_exact_and_synthetic_rewards():
    assert REWARDS["exact"].fn(_s(" yes\n", "yes")) == 1.0
    assert REWARDS["exact"].fn(_s("yes.", "yes")) == 0.0
    # symbol 5, max_len 3: L = 1 + 5 % 3 = 3; eos = 0
    meta = {"max_len": 3, "eos": 0}
    assert repeat_reward([1, 5, 9], [5, 5, 5, 0], max_len=3, eos=0) == 1.5
    assert repeat_reward([1, 5, 9], [5, 7, 5], max_len=3, eos=0) == pytest.approx(2 / 3)
    sample = _s("", prompt_ids=[1, 4, 9], response_ids=[4, 4, 2], metadata=meta)  # L = 2: both right, no stop
    assert REWARDS["repeat"].fn(sample) == 1.0


def test_batched_async_and_extras():
    def batched(samples):
        return [{"score": len(s.response), "len": len(s.response)} for s in samples]

    async def one(sample):
        await asyncio.sleep(0)
        return float(sample.label)

    samples = [_s("ab", "1", rid="a"), _s("abc", "2", rid="b")]
    out = score_samples(Reward("b", batched, batched=True), samples)
    assert out.scores.tolist() == [2.0, 3.0] and out.metrics() == {"reward/len": 2.5, "reward/errors": 0.0}
    assert score_samples(Reward("a", one), samples).scores.tolist() == [1.0, 2.0]


def test_raising_reward_is_named_or_zeroed_and_counted():
    def flaky(sample):
        if sample.rid == "b":
            raise KeyError("boom")
        return 1.0

    samples = [_s("x", rid="a"), _s("y", rid="b"), _s("z", rid="c")]
    with pytest.raises(RewardError, match="reward 'flaky' on sample b raised KeyError"):
        score_samples(Reward("flaky", flaky), samples)
    out = score_samples(Reward("flaky", flaky), samples, errors="zero")
    assert out.scores.tolist() == [1.0, 0.0, 1.0] and out.errors == 1 and out.metrics()["reward/errors"] == 1.0
    with pytest.raises(ValueError, match="--reward-errors"):
        score_samples(Reward("flaky", flaky), samples, errors="ignore")


@pytest.mark.parametrize("value, message", [("1.0", "returned '1.0'"), (float("nan"), "returned nan"),
                                             ({"acc": 1}, "returned a dict without 'score'"), (None, "returned None")])
def test_wrong_return_is_named(value, message):
    with pytest.raises(RewardError, match=f"reward 'bad' on sample r0: {message}"):
        score_samples(Reward("bad", lambda s: value), [_s("x")], errors="zero")


def test_custom_reward_loading(tmp_path):
    (tmp_path / "my_rm.py").write_text("def rm(sample):\n    return {'score': 2.0}\nNOT_CALLABLE = 3\n")
    reward = load_custom_reward(f"{tmp_path}/my_rm.py:rm")
    assert score_samples(reward, [_s("x")]).scores.tolist() == [2.0]
    assert get_reward("math", custom_path="vespo_megatron.rewards.builtin:exact_reward").fn(_s("a", "a")) == 1.0
    cases = [("no_colon", "expected module:function"), (f"{tmp_path}/nope.py:rm", "no file"),
             ("vespo_no_such_module:rm", "cannot import module 'vespo_no_such_module'"),
             (f"{tmp_path}/my_rm.py:missing", "has no attribute 'missing'"),
             (f"{tmp_path}/my_rm.py:NOT_CALLABLE", "is a int, not callable"),
             (f"{tmp_path}/broken.py:rm", "importing .*broken.py failed: ZeroDivisionError")]
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    for path, message in cases:
        with pytest.raises(ValueError, match=f"--custom-reward-path: .*{message}"):
            load_custom_reward(path)
    with pytest.raises(ValueError, match="--reward: unknown reward 'nope'; known: dapo, exact, math, repeat, reverse"):
        get_reward("nope")


def test_scores_are_float64_in_batch_order():
    out = score_samples(REWARDS["exact"], [_s("a", "a"), _s("b", "a"), _s("c", "c")])
    assert out.scores.dtype == np.float64 and out.scores.tolist() == [1.0, 0.0, 1.0]
