"""From generated records to reward samples: the response detokenised, the dataset row's label and metadata."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from vespo_megatron.rewards.registry import RewardSample


def reward_samples(records: Sequence[Any], prompts: Sequence[Any], tokenizer: Optional[Any] = None
                   ) -> list[RewardSample]:
    """One RewardSample per record.

    Args:
        records: rollout records (``rid``, ``prompt_ids``, ``response_ids``), prompt-major.
        prompts: the prompt of each record (``text``, ``label``, ``metadata``), same order and length.
        tokenizer: decodes the response (special tokens skipped); None leaves the texts empty (token rewards).
    """
    if len(records) != len(prompts):
        raise ValueError(f"reward samples: {len(records)} records for {len(prompts)} prompts")
    out = []
    for record, prompt in zip(records, prompts):
        response_ids = [int(t) for t in record.response_ids]
        text = tokenizer.decode(response_ids, skip_special_tokens=True) if tokenizer is not None else ""
        out.append(RewardSample(rid=record.rid, prompt=prompt.text, response=text,
                                prompt_ids=[int(t) for t in record.prompt_ids], response_ids=response_ids,
                                label=prompt.label, metadata=dict(prompt.metadata)))
    return out
