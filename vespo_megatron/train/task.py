"""Verifiable synthetic tasks a tiny MoE learns on CPU: repeat the prompt's symbol and stop at the right length
(``RepeatTask``), or reverse a symbol string of 8–48 tokens (``ReverseTask``, where response length matters).

Prompt: [BOS, s, f_1 … f_m] with a symbol s ∈ [first_symbol, first_symbol + num_symbols) and m random filler tokens.
Target: s repeated L(s) = 1 + (s mod max_len) times, then the stop token ``eos``. Reward (exact, in [0, 1.5]; the
formula is ``rewards.synthetic.repeat_reward``, registered as the ``repeat`` reward):
    r = (#{j < L : y_j = s} / L) + 0.5 · 1[y = s^L eos]
i.e. the fraction of the first L response tokens that are correct, plus a bonus for the exact answer with the stop
token at the right place. Responses vary in length (stop token or the max-new-tokens limit). The stop token is the
model's EOS when its files declare one, else the task's default ``EOS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vespo_megatron.data.prompts import Prompt
from vespo_megatron.rewards.synthetic import repeat_reward, reverse_reward

BOS, EOS = 1, 0  # the task's vocabulary: prompt start, and the stop token of models that declare none


@dataclass(frozen=True)
class RepeatTask:
    vocab_size: int = 256
    first_symbol: int = 2
    num_symbols: int = 8
    max_len: int = 3
    filler: int = 3
    eos: int = EOS

    def __post_init__(self) -> None:
        if self.first_symbol < 2 or self.first_symbol + self.num_symbols > self.vocab_size:
            raise ValueError(f"symbols [{self.first_symbol}, {self.first_symbol + self.num_symbols}) must lie in "
                             f"[2, vocab_size={self.vocab_size})")
        if self.max_len < 1 or self.num_symbols < 1 or self.filler < 0:
            raise ValueError("max_len and num_symbols must be >= 1, filler >= 0")
        if self.eos == BOS or self.first_symbol <= self.eos < self.first_symbol + self.num_symbols:
            raise ValueError(f"stop token {self.eos} collides with BOS or a symbol of the repeat task")

    def target_len(self, symbol: int) -> int:
        return 1 + symbol % self.max_len

    def prompts(self, num: int, seed: int) -> list[list[int]]:
        """``num`` prompts [2 + filler] drawn with ``seed`` (deterministic)."""
        rng = np.random.default_rng(seed)
        symbols = rng.integers(self.first_symbol, self.first_symbol + self.num_symbols, num)
        fill = rng.integers(self.first_symbol + self.num_symbols, self.vocab_size, (num, self.filler))
        return [[BOS, int(s), *map(int, f)] for s, f in zip(symbols, fill)]

    def reward(self, prompt: Sequence[int], response: Sequence[int]) -> float:
        """Exact reward of ``response`` (the stop token included if generated) for ``prompt``."""
        return repeat_reward(prompt, response, max_len=self.max_len, eos=self.eos)


@dataclass(frozen=True)
class ReverseTask:
    """Reverse a random symbol string of random length (the ``reverse`` reward, ``rewards.synthetic.reverse_reward``).

    Prompt [BOS, x_1 … x_L, sep] with L uniform in [min_len, max_len] and x_j uniform over the symbols
    [first_symbol, first_symbol + num_symbols); target x_L … x_1 then the stop token ``eos`` (L + 1 tokens).
    Reward, with n the response tokens before the stop token:
    r = #{j < min(n, L) : y_j = x_{L−j}} / max(L, n) + 0.5 · 1[exact]  ∈ [0, 1.5].
    """

    vocab_size: int = 32
    first_symbol: int = 3
    num_symbols: int = 8
    min_len: int = 8
    max_len: int = 48
    sep: int = 2
    eos: int = EOS

    def __post_init__(self) -> None:
        symbols = range(self.first_symbol, self.first_symbol + self.num_symbols)
        if self.first_symbol < 0 or self.first_symbol + self.num_symbols > self.vocab_size or self.num_symbols < 1:
            raise ValueError(f"symbols [{self.first_symbol}, {self.first_symbol + self.num_symbols}) must lie in "
                             f"[0, vocab_size={self.vocab_size})")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"lengths: need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        specials = (BOS, self.sep, self.eos)
        if len(set(specials)) < 3 or any(t in symbols for t in specials):
            raise ValueError(f"BOS {BOS}, sep {self.sep} and eos {self.eos} must be distinct and not symbols")

    def prompts(self, num: int, seed: int) -> list[list[int]]:
        """``num`` prompts [BOS, x_1 … x_L, sep] drawn with ``seed`` (deterministic)."""
        rng = np.random.default_rng(seed)
        lengths = rng.integers(self.min_len, self.max_len + 1, num)
        return [[BOS, *map(int, rng.integers(self.first_symbol, self.first_symbol + self.num_symbols, n)), self.sep]
                for n in lengths]

    def target(self, prompt: Sequence[int]) -> list[int]:
        """The exact answer of ``prompt``: its string reversed, then the stop token."""
        return [int(t) for t in prompt[-2:0:-1]] + [self.eos]

    def reward(self, prompt: Sequence[int], response: Sequence[int]) -> float:
        """Exact reward of ``response`` (the stop token included if generated) for ``prompt``."""
        return reverse_reward(prompt, response, eos=self.eos)


class TaskPrompts:
    """A synthetic task as a prompt source: draw k gives ``task.prompts(n, seed · 100003 + k)``; ``metadata`` (what
    the task's reward reads) travels with every prompt. State: the number of draws."""

    def __init__(self, task: Any, seed: int, metadata: dict[str, Any]) -> None:
        self.task, self.seed, self.metadata, self.draws = task, seed, metadata, 0
        self.epoch = 0

    def take(self, n: int) -> list[Prompt]:
        ids = self.task.prompts(n, seed=self.seed * 100_003 + self.draws)
        self.draws += 1
        return [Prompt(row=-1, ids=p, text="", label=None, metadata=dict(self.metadata)) for p in ids]

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])


def reverse_prompts(task: ReverseTask, seed: int) -> TaskPrompts:
    """The reverse task's prompt source (metadata: the stop token, for the ``reverse`` reward)."""
    return TaskPrompts(task, seed, {"eos": task.eos})


class RepeatPrompts(TaskPrompts):
    """The repeat task's prompt source (metadata: max_len and eos, for the ``repeat`` reward)."""

    def __init__(self, task: RepeatTask, seed: int) -> None:
        super().__init__(task, seed, {"max_len": task.max_len, "eos": task.eos})
