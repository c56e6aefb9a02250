"""The order in which prompts are drawn: epochs over the dataset, optionally shuffled, with a resumable position.

Epoch e visits every prompt once, in file order or in the permutation drawn from (seed, e); a draw that crosses the
end of an epoch continues in the next one. The whole state is the number of prompts drawn so far, so a run resumed
from ``state_dict()`` continues with the next unseen prompt.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class PromptOrder:
    """Indices into a dataset of ``num_prompts`` prompts, ``take(n)`` at a time."""

    def __init__(self, num_prompts: int, shuffle: bool = False, seed: int = 0) -> None:
        if num_prompts < 1:
            raise ValueError(f"num_prompts: must be >= 1, got {num_prompts}")
        self.num_prompts, self.shuffle, self.seed = num_prompts, shuffle, seed
        self.consumed = 0
        self._epoch_order: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        """The epoch of the next prompt (0-based)."""
        return self.consumed // self.num_prompts

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts) if self.shuffle
                     else np.arange(self.num_prompts))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def take(self, n: int) -> list[int]:
        """The next ``n`` prompt indices (crossing into the next epoch when needed)."""
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.consumed, self.num_prompts)
            out.append(int(self._order(epoch)[pos]))
            self.consumed += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "num_prompts": self.num_prompts, "shuffle": self.shuffle,
                "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the dataset size, shuffle and seed must be those of the saved run."""
        for key in ("num_prompts", "shuffle", "seed"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"prompt order: the checkpoint was written with {key}={state.get(key)!r}, this run "
                                 f"has {getattr(self, key)!r} (same --prompt-data, --rollout-shuffle and --seed)")
        consumed = state.get("consumed")
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"prompt order: bad consumed count {consumed!r} in the checkpoint")
        self.consumed = consumed
