"""The reverse task (train/task.py) and its ``reverse`` reward (rewards/synthetic.py): hand values, prompts, errors."""
import pytest

from vespo_megatron.rewards import REWARDS
from vespo_megatron.rewards.registry import RewardSample
from vespo_megatron.rewards.synthetic import reverse_reward
from vespo_megatron.train.task import BOS, ReverseTask, reverse_prompts

PROMPT = [BOS, 3, 4, 5, 6, 2]  # string 3 4 5 6 (L = 4), separator 2; target 6 5 4 3, stop token 0


@pytest.mark.parametrize("response, expected", [
    ([6, 5, 4, 3, 0], 1.5),  # exact with the stop token: 4/4 + 0.5
    ([6, 5, 4, 3], 1.0),  # every position right, no stop token: no bonus
    ([6, 5, 4, 3, 3, 3, 0], 4 / 6),  # two extra tokens dilute the credit: 4 / max(4, 6)
    ([6, 5, 0], 2 / 4),  # stops early: 2 right of 4
    ([6, 7, 4, 7, 0], 2 / 4),  # positions 0 and 2 right
    ([3, 4, 5, 6, 0], 0.0),  # the string copied, not reversed
    ([0], 0.0),  # empty answer
    ([6, 5, 0, 4, 3, 0], 2 / 4),  # credit stops at the first stop token
])
def test_reverse_reward_hand_values(response, expected):
    assert reverse_reward(PROMPT, response, eos=0) == pytest.approx(expected)


def test_reverse_reward_registered():
    sample = RewardSample(rid="r", prompt="", response="", prompt_ids=PROMPT, response_ids=[6, 5, 9, 3, 9],
                          metadata={"eos": 9})  # eos 9: stops after 6 5, 2 right of 4
    assert REWARDS["reverse"].fn(sample) == pytest.approx(0.5)


def test_reverse_task_prompts_lengths_and_targets():
    task = ReverseTask(vocab_size=32, min_len=8, max_len=48)
    prompts = task.prompts(400, seed=1)
    assert prompts == task.prompts(400, seed=1) and prompts != task.prompts(400, seed=2)
    lengths = [len(p) - 2 for p in prompts]
    assert min(lengths) == 8 and max(lengths) == 48  # both ends drawn in 400 prompts
    for p in prompts:
        assert p[0] == BOS and p[-1] == task.sep and all(3 <= t < 11 for t in p[1:-1])
        assert task.reward(p, task.target(p)) == 1.5
        assert task.target(p)[:-1] == p[-2:0:-1]


def test_reverse_prompt_source_resumes():
    task = ReverseTask(eos=0)
    source = reverse_prompts(task, seed=3)
    first = source.take(4)
    assert [p.ids for p in first] == task.prompts(4, seed=3 * 100_003) and first[0].metadata == {"eos": 0}
    state = source.state_dict()
    second = source.take(4)
    resumed = reverse_prompts(task, seed=3)
    resumed.load_state_dict(state)
    assert [p.ids for p in resumed.take(4)] == [p.ids for p in second]


@pytest.mark.parametrize("kwargs, message", [
    (dict(eos=5), "must be distinct and not symbols"),
    (dict(sep=BOS), "must be distinct"),
    (dict(min_len=10, max_len=9), "min_len <= max_len"),
    (dict(num_symbols=40), "must lie in"),
])
def test_reverse_task_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReverseTask(**kwargs)
