"""A verifiable synthetic task a tiny MoE learns on CPU in minutes: repeat the prompt's symbol, stop at the right length.

Prompt: [BOS, s, f_1 … f_m] with a symbol s ∈ [first_symbol, first_symbol + num_symbols) and m random filler tokens.
Target: s repeated L(s) = 1 + (s mod max_len) times, then EOS. Reward (exact, in [0, 1.5]):
    r = (#{j < L : y_j = s} / L) + 0.5 · 1[y = s^L EOS]
i.e. the fraction of the first L response tokens that are correct, plus a bonus for the exact answer with the stop
token at the right place. Responses vary in length (EOS or the max-new-tokens limit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

BOS, EOS = 1, 0


@dataclass(frozen=True)
class RepeatTask:
    vocab_size: int = 256
    first_symbol: int = 2
    num_symbols: int = 8
    max_len: int = 3
    filler: int = 3

    def __post_init__(self) -> None:
        if self.first_symbol < 2 or self.first_symbol + self.num_symbols > self.vocab_size:
            raise ValueError(f"symbols [{self.first_symbol}, {self.first_symbol + self.num_symbols}) must lie in "
                             f"[2, vocab_size={self.vocab_size})")
        if self.max_len < 1 or self.num_symbols < 1 or self.filler < 0:
            raise ValueError("max_len and num_symbols must be >= 1, filler >= 0")

    def target_len(self, symbol: int) -> int:
        return 1 + symbol % self.max_len

    def prompts(self, num: int, seed: int) -> list[list[int]]:
        """``num`` prompts [2 + filler] drawn with ``seed`` (deterministic)."""
        rng = np.random.default_rng(seed)
        symbols = rng.integers(self.first_symbol, self.first_symbol + self.num_symbols, num)
        fill = rng.integers(self.first_symbol + self.num_symbols, self.vocab_size, (num, self.filler))
        return [[BOS, int(s), *map(int, f)] for s, f in zip(symbols, fill)]

    def reward(self, prompt: Sequence[int], response: Sequence[int]) -> float:
        """Exact reward of ``response`` (EOS included if generated) for ``prompt``."""
        symbol = int(prompt[1])
        length = self.target_len(symbol)
        resp = [int(t) for t in response]
        correct = sum(1 for t in resp[:length] if t == symbol)
        exact = resp == [symbol] * length + [EOS]
        return correct / length + 0.5 * exact

    def rewards(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> np.ndarray:
        return np.array([self.reward(p, r) for p, r in zip(prompts, responses)], dtype=np.float64)
