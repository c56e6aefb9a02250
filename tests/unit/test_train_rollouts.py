"""Rollout sources: the asynchronous producer keeps the lag bound, order and errors; the task's reward is exact."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vespo_megatron.train.rollouts import AsyncRollouts, RolloutBatch, SyncRollouts
from vespo_megatron.train.task import EOS, RepeatTask


class Policy:
    """A trainer stand-in: version advances by one per consumed batch."""

    def __init__(self) -> None:
        self.version = 0
        self.produced: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def produce(self, iteration: int, version: int) -> RolloutBatch:
        with self.lock:
            self.produced.append((iteration, version))
        time.sleep(0.01)
        return RolloutBatch(iteration, version, [], np.zeros(0), [])


@pytest.mark.parametrize("max_lag", [1, 2, 3])
def test_async_lag_is_bounded_and_batches_arrive_in_order(max_lag):
    policy = Policy()
    source = AsyncRollouts(policy.produce, 0, max_lag, lambda: policy.version)
    lags = []
    for it in range(8):
        batch = source.get(it, policy.version)
        assert batch.iteration == it
        lags.append(policy.version - batch.version)
        time.sleep(0.03)  # a training step, slower than generation: the producer runs ahead meanwhile
        policy.version += 1
    source.close()
    assert max(lags) <= max_lag
    assert max(lags) >= 1  # generation really ran ahead of training


def test_async_producer_error_reaches_the_trainer():
    def fail(iteration: int, version: int) -> RolloutBatch:
        raise ConnectionError("engine went away")

    source = AsyncRollouts(fail, 0, 1, lambda: 0)
    with pytest.raises(RuntimeError, match="rollout producer failed"):
        source.get(0, 0)
    source.close()


def test_async_rejects_zero_lag_and_sync_generates_on_demand():
    with pytest.raises(ValueError, match="max_lag"):
        AsyncRollouts(lambda i, v: None, 0, 0, lambda: 0)
    policy = Policy()
    assert SyncRollouts(policy.produce).get(5, 7).version == 7 and policy.produced == [(5, 7)]


def test_task_reward_by_hand():
    task = RepeatTask(vocab_size=32)
    prompt = [1, 4, 20, 21, 22]  # symbol 4 -> target length 1 + 4 % 3 = 2
    assert task.target_len(4) == 2
    assert task.reward(prompt, [4, 4, EOS]) == 1.5
    assert task.reward(prompt, [4, 7, EOS]) == 0.5
    assert task.reward(prompt, [4, 4, 4]) == 1.0
    assert task.reward(prompt, []) == 0.0
    prompts = task.prompts(64, seed=3)
    assert prompts == task.prompts(64, seed=3) and all(2 <= p[1] < 10 and p[0] == 1 for p in prompts)
    with pytest.raises(ValueError, match="symbols"):
        RepeatTask(vocab_size=8)
