"""A prompt source for training: a dataset drawn in a resumable order (``take(n)`` prompts at a time).

``state_dict()`` after a draw is what a checkpoint stores, so that a resumed run continues with the next unseen
prompt (the trainer stores the state of the last batch it trained on, not of batches generated ahead).
"""
from __future__ import annotations

from typing import Any

from vespo_megatron.data.order import PromptOrder
from vespo_megatron.data.prompts import Prompt, PromptDataset


class DatasetPrompts:
    """``take(n)``: the next ``n`` prompts of ``dataset`` in epoch order (shuffled per epoch when asked)."""

    def __init__(self, dataset: PromptDataset, shuffle: bool = False, seed: int = 0) -> None:
        self.dataset = dataset
        self.order = PromptOrder(len(dataset), shuffle=shuffle, seed=seed)

    def take(self, n: int) -> list[Prompt]:
        return [self.dataset[i] for i in self.order.take(n)]

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)
