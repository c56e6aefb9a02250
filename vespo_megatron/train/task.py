"""A verifiable synthetic task a tiny MoE learns on CPU in minutes: repeat the prompt's symbol, stop at the right length.

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
from vespo_megatron.rewards.synthetic import repeat_reward

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


class RepeatPrompts:
    """The task as a prompt source: draw k gives ``task.prompts(n, seed · 100003 + k)``; the metadata carries what the
    ``repeat`` reward needs (max_len, eos). State: the number of draws."""

    def __init__(self, task: RepeatTask, seed: int) -> None:
        self.task, self.seed, self.draws = task, seed, 0
        self.epoch = 0

    def take(self, n: int) -> list[Prompt]:
        ids = self.task.prompts(n, seed=self.seed * 100_003 + self.draws)
        self.draws += 1
        meta = {"max_len": self.task.max_len, "eos": self.task.eos}
        return [Prompt(row=-1, ids=p, text="", label=None, metadata=meta) for p in ids]

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])
