"""Evaluation metrics of sampled answers (numpy): the unbiased pass@k estimator and per-set aggregation.

pass@k for a prompt with n samples of which c are correct (Chen et al., 2021):
    pass@k = 1 − C(n − c, k) / C(n, k) = 1 − Π_{i = n − c + 1}^{n} (1 − k / i)      (1 when n − c < k)
averaged over prompts. A sample is correct when its reward is ≥ ``threshold``.
"""
from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``n`` samples, ``c`` correct (1 ≤ k ≤ n, 0 ≤ c ≤ n)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k: need 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def eval_metrics(rewards: np.ndarray, response_lens: np.ndarray, threshold: float = 1.0) -> dict[str, float]:
    """Metrics of one eval set.

    Args:
        rewards: [num_prompts, n] reward of each sample.
        response_lens: [num_prompts, n] response length (tokens) of each sample.
        threshold: a sample is correct when its reward is >= threshold.

    Returns:
        {"mean_reward", "pass@1", "pass@n" (n > 1), "response_len"}: means over prompts and samples.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.size == 0:
        raise ValueError(f"rewards: expected [num_prompts, n], got shape {rewards.shape}")
    if np.shape(response_lens) != rewards.shape:
        raise ValueError(f"response_lens: shape {np.shape(response_lens)} != rewards {rewards.shape}")
    n = rewards.shape[1]
    correct = (rewards >= threshold).sum(axis=1)
    out = {"mean_reward": float(rewards.mean()),
           "pass@1": float(np.mean([pass_at_k(n, int(c), 1) for c in correct]))}
    if n > 1:
        out[f"pass@{n}"] = float(np.mean([pass_at_k(n, int(c), n) for c in correct]))
    out["response_len"] = float(np.mean(response_lens))
    return out
