"""The built-in rewards: ``math``, ``dapo``, ``exact``, and ``repeat`` / ``reverse`` (the synthetic tasks,
rewards/synthetic.py)."""
from __future__ import annotations

from vespo_megatron.rewards.math import dapo_score, math_equal
from vespo_megatron.rewards.registry import RewardSample, register_reward
from vespo_megatron.rewards.synthetic import repeat_reward, reverse_reward


@register_reward("math")
def math_reward(sample: RewardSample) -> float:
    """1.0 when the response's final answer is math-equivalent to the label (math-verify), else 0.0."""
    return float(math_equal(sample.response, sample.label))


@register_reward("dapo")
def dapo_reward(sample: RewardSample) -> dict[str, float]:
    """DAPO-Math: +1 / -1 on the normalised answer after the last "Answer:"; ``acc`` logged."""
    return dapo_score(sample.response, sample.label)


@register_reward("exact")
def exact_reward(sample: RewardSample) -> float:
    """1.0 when the response equals the label after stripping surrounding whitespace, else 0.0."""
    return float(sample.response.strip() == str(sample.label).strip())


@register_reward("repeat")
def repeat_task_reward(sample: RewardSample) -> float:
    """The synthetic RepeatTask's exact reward on token ids; the task's parameters travel in the metadata
    (``max_len`` and ``eos``, written by the task's prompt source)."""
    return repeat_reward(sample.prompt_ids, sample.response_ids, max_len=int(sample.metadata["max_len"]),
                         eos=int(sample.metadata["eos"]))


@register_reward("reverse")
def reverse_task_reward(sample: RewardSample) -> float:
    """The synthetic ReverseTask's exact reward on token ids; the stop token travels in the metadata (``eos``)."""
    return reverse_reward(sample.prompt_ids, sample.response_ids, eos=int(sample.metadata["eos"]))
