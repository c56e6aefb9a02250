"""The synthetic repeat task's reward (train/task.py draws its prompts): repeat the prompt's symbol, then stop.

Prompt [BOS, s, f_1 … f_m]; target s repeated L(s) = 1 + (s mod max_len) times, then the stop token ``eos``:
    r = #{j < L : y_j = s} / L + 0.5 · 1[y = s^L eos]     (in [0, 1.5])
"""
from __future__ import annotations

from typing import Sequence


def target_len(symbol: int, max_len: int) -> int:
    """L(s) = 1 + s mod max_len."""
    return 1 + symbol % max_len


def repeat_reward(prompt_ids: Sequence[int], response_ids: Sequence[int], max_len: int, eos: int) -> float:
    """Exact reward of ``response_ids`` (the stop token included if generated) for ``prompt_ids``."""
    symbol = int(prompt_ids[1])
    length = target_len(symbol, max_len)
    resp = [int(t) for t in response_ids]
    correct = sum(1 for t in resp[:length] if t == symbol)
    return correct / length + 0.5 * (resp == [symbol] * length + [eos])
