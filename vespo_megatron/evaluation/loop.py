"""The evaluation loop over a rollout client: every prompt of every set, ``n`` samples each (greedy or sampled),
scored by the run's reward, reduced to ``eval/NAME/{mean_reward, pass@1, pass@n, response_len}``.

The client is anything with ``generate(prompt_ids, sampling_params, samples_per_prompt=, seed=, rid_prefix=)``
returning prompt-major records (the SGLang clients), so evaluation runs against the same engine(s) and the
weights they hold.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from vespo_megatron.data.prompts import PromptDataset
from vespo_megatron.metrics.pass_at_k import eval_metrics
from vespo_megatron.rewards.registry import Reward
from vespo_megatron.rewards.samples import reward_samples
from vespo_megatron.rewards.score import score_samples

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    name: str
    dataset: PromptDataset


def evaluate(client: Any, sets: Sequence[EvalSet], reward: Reward, sampling_params: dict[str, Any],
             n_samples: int, *, tokenizer: Optional[Any] = None, seed: int = 0, reward_errors: str = "raise",
             correct_threshold: float = 1.0, tag: str = "") -> dict[str, float]:
    """Evaluate every set; returns {"eval/NAME/metric": value} (plus ``eval/NAME/reward/errors`` when counted).

    Args:
        client: the rollout client (see the module docstring).
        sets: the eval sets.
        reward: the reward that scores the samples.
        sampling_params: SGLang sampling params (temperature 0 for greedy).
        n_samples: samples per prompt (``--n-samples-per-eval-prompt``); pass@n is logged when n > 1.
        tokenizer: decodes responses for text rewards.
        seed: sampling seed of the evaluation.
        reward_errors: "raise" or "zero" (see rewards.score).
        correct_threshold: a sample is correct when its reward is >= this (pass@k).
        tag: request-id prefix (e.g. the iteration).
    """
    if n_samples < 1:
        raise ValueError(f"--n-samples-per-eval-prompt: must be >= 1, got {n_samples}")
    out: dict[str, float] = {}
    for s in sets:
        prompts = s.dataset.prompts
        records = client.generate([p.ids for p in prompts], sampling_params, samples_per_prompt=n_samples,
                                  seed=seed, rid_prefix=f"eval{tag}-{s.name}")
        samples = reward_samples(records, [p for p in prompts for _ in range(n_samples)], tokenizer)
        scores = score_samples(reward, samples, reward_errors)
        lens = np.array([len(r.response_ids) for r in records], dtype=np.float64).reshape(len(prompts), n_samples)
        metrics = eval_metrics(scores.scores.reshape(len(prompts), n_samples), lens, correct_threshold)
        if scores.errors:
            metrics["reward/errors"] = float(scores.errors)
        out.update({f"eval/{s.name}/{key}": value for key, value in metrics.items()})
        logger.info("eval %s: %s", s.name, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return out
