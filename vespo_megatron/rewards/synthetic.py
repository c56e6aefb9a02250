"""The synthetic tasks' rewards (train/task.py draws their prompts). Repeat: repeat the prompt's symbol, then stop.

Prompt [BOS, s, f_1 … f_m]; target s repeated L(s) = 1 + (s mod max_len) times, then the stop token ``eos``:
    r = #{j < L : y_j = s} / L + 0.5 · 1[y = s^L eos]     (in [0, 1.5])
Reverse: write the prompt's symbol string backwards, then stop (``reverse_reward``).
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


def reverse_reward(prompt_ids: Sequence[int], response_ids: Sequence[int], eos: int) -> float:
    """The reverse task's reward: prompt [BOS, x_1 … x_L, SEP], target x_L … x_1 then ``eos``.

    With n = the response's tokens before its first ``eos`` (all of them if it has none),
        r = #{j < min(n, L) : y_j = x_{L−j}} / max(L, n) + 0.5 · 1[y = x_L … x_1 eos]     (in [0, 1.5])
    i.e. partial credit per position, diluted by the tokens written beyond L (length matters both ways), plus a bonus
    for the exact answer with the stop token at the right place.
    """
    target = [int(t) for t in prompt_ids[-2:0:-1]]
    resp = [int(t) for t in response_ids]
    body = resp[:resp.index(eos)] if eos in resp else resp
    correct = sum(1 for y, x in zip(body, target) if y == x)
    return correct / max(len(target), len(body), 1) + 0.5 * (resp == target + [eos])
