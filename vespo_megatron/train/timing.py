"""Per-stage wall-clock timings of one RL step (seconds, measured on rank 0) and the step's throughput.

Stages: ``rollout`` (waiting for the step's batch from the engines: generation in synchronous mode, only the
un-overlapped wait in asynchronous mode), ``reward`` (scoring the batch's responses; in asynchronous mode this ran in
the producer thread, overlapped with training), ``pack`` (advantages, the micro-batch plan, delivery to the ranks and
packing), ``old_logp`` (the forward-only π_old pass), ``update`` (the N optimizer steps), ``weight_sync`` (Megatron ->
engines) and ``step`` (the whole step). Throughput: ``tokens_per_s`` = Σ (prompt + response tokens) of the batch /
step seconds, ``samples_per_s`` = samples of the batch / step seconds.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

STAGES = ("rollout", "reward", "pack", "old_logp", "update", "weight_sync", "step")


class StepTimer:
    """Accumulates seconds per stage for one step; ``metrics`` renders ``timing/*`` and ``throughput/*``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Adds the wall time of the ``with`` block to stage ``name``."""
        if name not in STAGES:
            raise ValueError(f"stage {name!r}: one of {STAGES}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def metrics(self, tokens: int, samples: int) -> dict[str, float]:
        """``timing/<stage>`` for every stage (0 for a stage that did not run) and the throughput of the step."""
        out = {f"timing/{name}": float(self.seconds.get(name, 0.0)) for name in STAGES}
        step = out["timing/step"]
        out["throughput/tokens_per_s"] = tokens / step if step > 0 else 0.0
        out["throughput/samples_per_s"] = samples / step if step > 0 else 0.0
        return out
