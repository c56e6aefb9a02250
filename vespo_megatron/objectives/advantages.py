"""GRPO outcome advantages: rewards normalised within each group of responses to the same prompt.

A_i = (r_i − mean_g) / (std_g + eps) with the unbiased std of group g (or A_i = r_i − mean_g without std
normalisation, as in Dr. GRPO). A group of one response has mean 0 and std 1, as in verl.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor


def grpo_advantages(
    rewards: Tensor, group_ids: Tensor | Sequence[Hashable], norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Advantages [num_seqs] from scalar rewards [num_seqs] and group ids (tensor or sequence of hashables)."""
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError("rewards: expected a 1-D floating-point tensor [num_seqs]")
    if rewards.numel() == 0:
        raise ValueError("rewards: empty batch")
    bad = (~torch.isfinite(rewards)).nonzero()
    if bad.numel():
        raise ValueError(f"rewards: non-finite reward at row {int(bad[0])}")
    if len(group_ids) != rewards.numel():
        raise ValueError(f"group_ids: {len(group_ids)} ids for {rewards.numel()} rewards")
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps!r}")
    if isinstance(group_ids, Tensor):
        _, index = torch.unique(group_ids, return_inverse=True)
    else:
        codes: dict[Hashable, int] = {}
        index = torch.tensor([codes.setdefault(g, len(codes)) for g in group_ids], dtype=torch.int64)
    index = index.to(rewards.device)
    num_groups = int(index.max()) + 1
    size = rewards.new_zeros(num_groups).index_add(0, index, torch.ones_like(rewards))
    mean = rewards.new_zeros(num_groups).index_add(0, index, rewards) / size
    centred = rewards - mean[index]
    sq = rewards.new_zeros(num_groups).index_add(0, index, centred**2)
    std = (sq / (size - 1).clamp(min=1)).sqrt()
    singleton = size[index] == 1
    centred = torch.where(singleton, rewards, centred)  # verl: mean 0 ...
    if not norm_by_std:
        return centred
    return centred / (torch.where(singleton, torch.ones_like(std[index]), std[index]) + eps)  # ... and std 1
