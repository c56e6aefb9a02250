"""pass@k against hand values, eval aggregation, and the eval loop over a stub rollout client."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from vespo_megatron.data.prompts import Prompt, PromptDataset
from vespo_megatron.evaluation import EvalSet, evaluate
from vespo_megatron.metrics.pass_at_k import eval_metrics, pass_at_k
from vespo_megatron.rewards import REWARDS, Reward, RewardError


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 1 - 21/252
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 4) == 1.0  # n - c < k
    with pytest.raises(ValueError, match="n=3, c=1, k=4"):
        pass_at_k(3, 1, 4)


def test_eval_metrics_aggregate_over_prompts():
    rewards = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    lens = np.array([[2, 4, 6], [1, 1, 1]])
    out = eval_metrics(rewards, lens)
    assert out == pytest.approx({"mean_reward": 0.5, "pass@1": (1 / 3 + 2 / 3) / 2,
                                 "pass@3": 1.0, "response_len": 15 / 6})
    assert set(eval_metrics(np.array([[1.0], [0.0]]), np.ones((2, 1)))) == {"mean_reward", "pass@1", "response_len"}
    assert eval_metrics(np.array([[-1.0, 1.0]]), np.ones((1, 2)), threshold=0.5)["pass@1"] == 0.5
    with pytest.raises(ValueError, match="response_lens"):
        eval_metrics(rewards, np.ones((2, 2)))


class StubClient:
    """Answers prompt p's j-th sample with the ids of ``answers[p][j]`` (one id per character)."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, prompts, sampling_params, *, samples_per_prompt, seed, rid_prefix):
        self.calls.append((sampling_params, samples_per_prompt, rid_prefix))
        out = []
        for i, ids in enumerate(prompts):
            for j in range(samples_per_prompt):
                text = self.answers[tuple(ids)][j]
                out.append(SimpleNamespace(rid=f"{rid_prefix}-{len(out)}", prompt_ids=list(ids),
                                           response_ids=[ord(c) for c in text]))
        return out


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_eval_loop_over_a_client():
    data = PromptDataset("m.jsonl", [Prompt(0, [1, 2], "What is 1+2?", "3", {}),
                                     Prompt(1, [3, 4], "What is 2+2?", "4", {})])
    client = StubClient({(1, 2): [r"\boxed{3}", r"\boxed{5}"], (3, 4): [r"\boxed{1}", "four"]})
    params = {"temperature": 0.0, "max_new_tokens": 16}
    out = evaluate(client, [EvalSet("arith", data)], REWARDS["math"], params, 2, tokenizer=CharTokenizer(), tag="3")
    assert out == pytest.approx({"eval/arith/mean_reward": 0.25, "eval/arith/pass@1": 0.25, "eval/arith/pass@2": 0.5,
                                 "eval/arith/response_len": (9 + 9 + 9 + 4) / 4})
    assert client.calls == [(params, 2, "eval3-arith")]


def test_eval_reward_errors_are_named_or_counted():
    data = PromptDataset("m.jsonl", [Prompt(0, [1], "q", "a", {})])
    client = StubClient({(1,): ["x"]})

    def broken(sample):
        raise RuntimeError("verifier down")

    with pytest.raises(RewardError, match="reward 'broken' on sample evalt-s-0 raised RuntimeError"):
        evaluate(client, [EvalSet("s", data)], Reward("broken", broken), {}, 1, tag="t")
    out = evaluate(client, [EvalSet("s", data)], Reward("broken", broken), {}, 1, reward_errors="zero")
    assert out["eval/s/reward/errors"] == 1.0 and out["eval/s/mean_reward"] == 0.0


def test_pass_at_k_matches_the_combinatorial_definition():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
