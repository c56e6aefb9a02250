"""Rewards: one registry (``REWARDS``, ``register_reward``, ``get_reward``; users' functions by
``module:function``) with one signature, and batch scoring with errors named or zeroed (``score_samples``)."""
from vespo_megatron.rewards.registry import (REWARDS, Reward, RewardSample, get_reward, load_custom_reward,
                                             register_reward)
from vespo_megatron.rewards import builtin  # noqa: F401 - registers the built-in rewards
from vespo_megatron.rewards.samples import reward_samples
from vespo_megatron.rewards.score import REWARD_ERRORS, RewardError, RewardScores, score_samples

__all__ = ["REWARDS", "REWARD_ERRORS", "Reward", "RewardError", "RewardSample", "RewardScores", "get_reward",
           "load_custom_reward", "register_reward", "reward_samples", "score_samples"]
