"""Scoring a batch of samples with one reward: sync, batched or async, with errors named or zeroed and counted.

A reward that raises is an error naming the sample (its rid) and the function, or with ``errors="zero"`` that sample
gets 0 and is counted in ``errors`` (logged as ``reward/errors``). A value that is not a finite number or a dict with
a finite numeric "score" is always an error (it is a bug, not a flaky verification).
"""
from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np

from vespo_megatron.rewards.registry import Reward, RewardSample

logger = logging.getLogger(__name__)

REWARD_ERRORS = ("raise", "zero")


class RewardError(RuntimeError):
    """A reward function failed or returned a wrong value; the message names the sample and the function."""


@dataclass
class RewardScores:
    """scores [num_samples] (fp64); extras: numeric dict entries by key, averaged into ``reward/<key>``; errors: the
    number of samples zeroed under ``errors="zero"``."""

    scores: np.ndarray
    extras: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0

    def metrics(self) -> dict[str, float]:
        out = {f"reward/{k}": float(np.mean(v)) for k, v in self.extras.items()}
        out["reward/errors"] = float(self.errors)
        return out


def _check(value: Any, sample: RewardSample, reward: Reward) -> tuple[float, dict[str, float]]:
    extras: dict[str, float] = {}
    score = value
    if isinstance(value, dict):
        if "score" not in value:
            raise RewardError(f"reward {reward.name!r} on sample {sample.rid}: returned a dict without 'score' "
                              f"(keys: {sorted(value)})")
        score = value["score"]
        extras = {k: float(v) for k, v in value.items() if k != "score" and isinstance(v, Real)}
    if not isinstance(score, Real) or not math.isfinite(float(score)):
        raise RewardError(f"reward {reward.name!r} on sample {sample.rid}: returned {value!r}; expected a finite "
                          "number or a dict with a finite 'score'")
    return float(score), extras


def _call_all(reward: Reward, samples: list[RewardSample], errors: str) -> list[Any]:
    """The raw values (or the exceptions, under ``errors="zero"``), one per sample."""
    if reward.batched:
        try:
            values = reward.fn(samples)
            if reward.is_async:
                values = asyncio.run(values)
        except Exception as err:  # noqa: BLE001 - named, or zeroed on request
            if errors != "zero":
                raise RewardError(f"reward {reward.name!r} on the batch {samples[0].rid}..{samples[-1].rid} "
                                  f"raised {type(err).__name__}: {err}") from err
            return [err] * len(samples)
        if not isinstance(values, (list, tuple)) or len(values) != len(samples):
            raise RewardError(f"reward {reward.name!r}: a batched reward must return one value per sample "
                              f"({len(samples)}), got {type(values).__name__}")
        return list(values)
    if reward.is_async:
        async def gather() -> list[Any]:
            return await asyncio.gather(*(reward.fn(s) for s in samples), return_exceptions=True)

        values = asyncio.run(gather())
    else:
        values = []
        for s in samples:
            try:
                values.append(reward.fn(s))
            except Exception as err:  # noqa: BLE001 - named, or zeroed on request
                values.append(err)
    for s, v in zip(samples, values):
        if isinstance(v, Exception) and errors != "zero":
            raise RewardError(f"reward {reward.name!r} on sample {s.rid} raised {type(v).__name__}: {v}") from v
    return values


def score_samples(reward: Reward, samples: list[RewardSample], errors: str = "raise") -> RewardScores:
    """Score every sample.

    Args:
        reward: the function (registry or custom).
        samples: the samples of a batch, in batch order.
        errors: "raise" (an exception names the sample and the function) or "zero" (0, counted).

    Returns:
        RewardScores with scores [num_samples].
    """
    if errors not in REWARD_ERRORS:
        raise ValueError(f"--reward-errors: {' or '.join(REWARD_ERRORS)}, got {errors!r}")
    values = _call_all(reward, samples, errors)
    scores = np.zeros(len(samples), dtype=np.float64)
    extras: dict[str, list[float]] = {}
    failed = 0
    for i, (sample, value) in enumerate(zip(samples, values)):
        if isinstance(value, Exception):
            failed += 1
            logger.warning("reward %r on sample %s raised %s: %s (scored 0)", reward.name, sample.rid,
                           type(value).__name__, value)
            continue
        scores[i], more = _check(value, sample, reward)
        for key, v in more.items():
            extras.setdefault(key, []).append(v)
    return RewardScores(scores, extras, failed)
