"""Outcome advantage estimators (one registry, verl's definitions) and DAPO's dynamic-sampling group filter.

Inputs: scalar rewards r [num_seqs] and a group id per sample (the prompt it answers; tensor or hashables). With
group g of size n_g, mean m_g and unbiased std s_g:

- ``grpo``:     A_i = (r_i − m_g) / (s_g + eps)          (a group of one: m = 0, s = 1, as in verl)
- ``dr-grpo``:  A_i = r_i − m_g                           (GRPO without std normalisation; a group of one: A = r)
- ``rloo``:     A_i = r_i − mean_{j≠i} r_j = n_g/(n_g − 1) · (r_i − m_g)   (a group of one: A = r)
- ``reinforce++-baseline``: a_i = r_i − m_g (a group of one: a = r), then whitened over the batch's response tokens:
  A_i = (a_i − μ) / sqrt(σ² + 1e-8), μ and σ² (unbiased) taken over tokens, i.e. sample i weighted by its response
  length ``response_lengths[i]`` (weight 1 each when not given).

Dynamic sampling (DAPO): :func:`varying_groups` keeps the samples of groups whose rewards are not all equal (a group
of one is kept, as in verl); the producer draws more prompts until the batch is full and counts what it dropped.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Callable, Optional

import torch
from torch import Tensor

GroupIds = Tensor | Sequence[Hashable]
WHITEN_EPS = 1e-8


def _group_index(rewards: Tensor, group_ids: GroupIds) -> Tensor:
    """Validate the rewards [num_seqs] and return each sample's group as 0..G−1 [num_seqs] (int64)."""
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError("rewards: expected a 1-D floating-point tensor [num_seqs]")
    if rewards.numel() == 0:
        raise ValueError("rewards: empty batch")
    bad = (~torch.isfinite(rewards)).nonzero()
    if bad.numel():
        raise ValueError(f"rewards: non-finite reward at row {int(bad[0])}")
    if len(group_ids) != rewards.numel():
        raise ValueError(f"group_ids: {len(group_ids)} ids for {rewards.numel()} rewards")
    if isinstance(group_ids, Tensor):
        _, index = torch.unique(group_ids, return_inverse=True)
    else:
        codes: dict[Hashable, int] = {}
        index = torch.tensor([codes.setdefault(g, len(codes)) for g in group_ids], dtype=torch.int64)
    return index.to(rewards.device)


def _group_sum(values: Tensor, index: Tensor) -> Tensor:
    return values.new_zeros(int(index.max()) + 1).index_add(0, index, values)


def _centred(rewards: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """(r − m_g with m = 0 for groups of one [num_seqs], group size per sample [num_seqs])."""
    size = _group_sum(torch.ones_like(rewards), index)[index]
    mean = (_group_sum(rewards, index) / _group_sum(torch.ones_like(rewards), index))[index]
    return torch.where(size == 1, rewards, rewards - mean), size


def grpo_advantages(rewards: Tensor, group_ids: GroupIds, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages [num_seqs] (``norm_by_std=False``: Dr. GRPO)."""
    index = _group_index(rewards, group_ids)
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps!r}")
    centred, size = _centred(rewards, index)
    if not norm_by_std:
        return centred
    sq = _group_sum(torch.where(size == 1, torch.zeros_like(centred), centred) ** 2, index)
    std = (sq / (_group_sum(torch.ones_like(rewards), index) - 1).clamp(min=1)).sqrt()[index]
    return centred / (torch.where(size == 1, torch.ones_like(std), std) + eps)


def dr_grpo_advantages(rewards: Tensor, group_ids: GroupIds) -> Tensor:
    """Dr. GRPO advantages [num_seqs]: r − m_g."""
    return grpo_advantages(rewards, group_ids, norm_by_std=False)


def rloo_advantages(rewards: Tensor, group_ids: GroupIds) -> Tensor:
    """RLOO advantages [num_seqs]: n/(n − 1)·(r − m_g) (leave-one-out baseline); r for groups of one."""
    centred, size = _centred(rewards, _group_index(rewards, group_ids))
    return torch.where(size == 1, centred, centred * size / (size - 1).clamp(min=1))


def reinforce_pp_baseline_advantages(rewards: Tensor, group_ids: GroupIds,
                                     response_lengths: Optional[Tensor] = None) -> Tensor:
    """REINFORCE++ with a group-mean baseline, whitened over response tokens [num_seqs] (see the module docstring)."""
    centred, _ = _centred(rewards, _group_index(rewards, group_ids))
    weights = torch.ones_like(rewards) if response_lengths is None else response_lengths.to(rewards)
    if weights.shape != rewards.shape or bool((weights < 1).any()):
        raise ValueError(f"response_lengths: expected [{rewards.numel()}] lengths >= 1")
    total = weights.sum()
    if total <= 1:
        raise ValueError("reinforce++-baseline: whitening needs at least two response tokens in the batch")
    mean = (weights * centred).sum() / total
    var = (weights * (centred - mean) ** 2).sum() / total * (total / (total - 1))
    return (centred - mean) * torch.rsqrt(var + WHITEN_EPS)


Estimator = Callable[..., Tensor]
ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "grpo": grpo_advantages,
    "dr-grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce++-baseline": reinforce_pp_baseline_advantages,
}


def compute_advantages(name: str, rewards: Tensor, group_ids: GroupIds,
                       response_lengths: Optional[Tensor] = None) -> Tensor:
    """Advantages [num_seqs] of the estimator ``name`` (``--advantage-estimator``)."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"--advantage-estimator: unknown estimator {name!r}; known: "
                         f"{', '.join(ADVANTAGE_ESTIMATORS)}")
    if name == "reinforce++-baseline":
        return reinforce_pp_baseline_advantages(rewards, group_ids, response_lengths)
    return ADVANTAGE_ESTIMATORS[name](rewards, group_ids)


def varying_groups(rewards: Tensor, group_ids: GroupIds) -> Tensor:
    """DAPO dynamic sampling: keep mask [num_seqs], False for the samples of groups (of two or more) whose rewards
    are all equal (they carry no GRPO signal)."""
    index = _group_index(rewards, group_ids)
    groups = int(index.max()) + 1
    high = rewards.new_full((groups,), float("-inf")).scatter_reduce(0, index, rewards, "amax")
    low = rewards.new_full((groups,), float("inf")).scatter_reduce(0, index, rewards, "amin")
    size = _group_sum(torch.ones_like(rewards), index)
    return ((high > low) | (size == 1))[index]
