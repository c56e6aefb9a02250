"""Where a training step's rollouts come from: synchronous (generated at the current policy) or fully asynchronous
(a producer thread generates ahead, at most ``max_lag`` policy versions behind the trainer).

A :class:`RolloutBatch` is the global batch of one step: prompt-major records (``n`` samples per prompt), their
rewards, the policy version whose weights the engine held when generation started, and the prompt source's state
after its prompts were drawn (what a checkpoint stores, so that a resumed run continues with the next unseen prompt
even when asynchronous batches were generated ahead).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from vespo_megatron.objectives.advantages import varying_groups
from vespo_megatron.packing.sample import Sample
from vespo_megatron.rewards import Reward, reward_samples, score_samples
from vespo_megatron.rollout.records import RolloutRecord
from vespo_megatron.routing.trace import PackedTrace, TraceSpec
from vespo_megatron.routing.trace import pack as pack_trace


@dataclass
class RolloutBatch:
    iteration: int
    version: int
    records: list[RolloutRecord]
    rewards: np.ndarray  # [gbs]
    group_ids: list[int]  # [gbs] prompt index of each sample
    metrics: dict[str, float] = field(default_factory=dict)  # reward extras, dynamic sampling, data epoch
    data_state: Optional[dict[str, Any]] = None  # the prompt source's state after this batch's prompts
    reward_seconds: float = 0.0  # wall time spent scoring this batch (train/timing.py)

    def samples(self, advantages: np.ndarray) -> list[Sample]:
        """Packer samples (tokens, rollout log-probs, advantage), in batch order."""
        return [Sample(prompt=np.asarray(record.prompt_ids, np.int64),
                       response=np.asarray(record.response_ids, np.int64),
                       rollout_logprobs=np.asarray(record.logprobs, np.float32),
                       advantage=float(adv))
                for record, adv in zip(self.records, advantages.tolist())]

    def routing_trace(self, spec: TraceSpec) -> PackedTrace:
        """The engine's experts of every sample, validated and stored compactly [Σrows, num_moe_layers, topk]."""
        missing = [r.rid for r in self.records if r.routing is None]
        if missing:
            raise ValueError(f"request {missing[0]}: routing replay r3 needs routed experts from the engine")
        return pack_trace([np.ascontiguousarray(r.routing[:, list(spec.moe_layers)]) for r in self.records], spec,
                          sample_ids=[r.rid for r in self.records])


Produce = Callable[[int, int], RolloutBatch]  # (iteration, policy version) -> batch


class SyncRollouts:
    """Each step's batch is generated on demand, at the current policy version."""

    def __init__(self, produce: Produce) -> None:
        self.produce = produce

    def get(self, iteration: int, version: int) -> RolloutBatch:
        return self.produce(iteration, version)

    def close(self) -> None:
        pass


class AsyncRollouts:
    """A producer thread generates batches ahead of the trainer.

    The trainer consumes the batch of iteration j at policy version j (one version per step), so generation for
    iteration j starts only once the version is ≥ j − max_lag: every batch is at most ``max_lag`` versions old when it
    is used (a response may still span versions when weights change during its generation). ``get`` checks the bound.
    """

    def __init__(self, produce: Produce, first_iteration: int, max_lag: int, current_version: Callable[[], int]):
        if max_lag < 1:
            raise ValueError(f"max_lag: must be >= 1, got {max_lag}")
        self.max_lag = max_lag
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(
            target=self._run, args=(produce, first_iteration, current_version), daemon=True, name="rollouts"
        )
        self._thread.start()

    def _run(self, produce: Produce, iteration: int, current_version: Callable[[], int]) -> None:
        try:
            while not self._stop.is_set():
                if current_version() < iteration - self.max_lag:
                    self._stop.wait(0.01)
                    continue
                self._queue.put(produce(iteration, current_version()))
                iteration += 1
        except BaseException as err:  # noqa: BLE001 - re-raised in the trainer's thread
            self._error = err

    def get(self, iteration: int, version: int) -> RolloutBatch:
        while True:
            if self._error is not None:
                raise RuntimeError("rollout producer failed") from self._error
            try:
                batch = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        if batch.iteration != iteration:
            raise RuntimeError(f"rollout batch for iteration {batch.iteration} arrived at iteration {iteration}")
        if version - batch.version > self.max_lag:
            raise RuntimeError(f"rollout lag {version - batch.version} exceeds max_lag {self.max_lag}")
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def make_producer(client: Any, prompts: Any, reward: Reward, *, rollout_batch_size: int, n: int,
                  sampling: dict[str, Any], seed: int, routing: bool, tokenizer: Optional[Any] = None,
                  reward_errors: str = "raise", dynamic_sampling: bool = False, max_rounds: int = 1) -> Produce:
    """Produce(iteration, version): prompts -> engine -> rewards (-> dynamic sampling) -> a batch.

    ``prompts`` is a prompt source (``take(n)``, ``state_dict()``, ``epoch``). With ``dynamic_sampling`` a round of
    ``rollout_batch_size`` prompts is generated and groups whose rewards are all equal are dropped, until the batch
    has ``rollout_batch_size`` groups (the surplus of the last round is dropped too) or ``max_rounds`` rounds ran
    (an error). Batch metrics: reward extras and errors, ``dynamic_sampling/{dropped_groups,rounds}``, ``data/epoch``.
    """

    def produce(iteration: int, version: int) -> RolloutBatch:
        records: list[RolloutRecord] = []
        rewards: list[float] = []
        extras: dict[str, list[float]] = {}
        errors = dropped = rounds = 0
        reward_seconds = 0.0
        while len(records) < rollout_batch_size * n:
            if rounds == max_rounds:
                raise RuntimeError(
                    f"iteration {iteration}: dynamic sampling kept {len(records) // n} of {rollout_batch_size} groups "
                    f"in {rounds} rounds (every other group had equal rewards); raise --dynamic-sampling-max-rounds")
            drawn = prompts.take(rollout_batch_size)
            new = client.generate([p.ids for p in drawn], sampling, samples_per_prompt=n,
                                  seed=seed + iteration + 1_000_003 * rounds, return_routed_experts=routing,
                                  rid_prefix=f"it{iteration}" + (f"r{rounds}" if rounds else ""))
            start = time.perf_counter()
            scores = score_samples(reward, reward_samples(new, [p for p in drawn for _ in range(n)], tokenizer),
                                   reward_errors)
            reward_seconds += time.perf_counter() - start
            errors += scores.errors
            for key, values in scores.extras.items():
                extras.setdefault(key, []).extend(values)
            keep = np.ones(len(new), dtype=bool)
            if dynamic_sampling:
                keep = varying_groups(torch.from_numpy(scores.scores), [i // n for i in range(len(new))]).numpy()
                dropped += int((~keep).sum()) // n
            room = rollout_batch_size * n - len(records)
            picked = np.flatnonzero(keep)[:room]
            dropped += (int(keep.sum()) - len(picked)) // n
            records += [new[i] for i in picked]
            rewards += scores.scores[picked].tolist()
            rounds += 1
        metrics = {f"reward/{k}": float(np.mean(v)) for k, v in extras.items()}
        metrics.update({"reward/errors": float(errors), "data/epoch": float(prompts.epoch)})
        if dynamic_sampling:
            metrics["dynamic_sampling/dropped_groups"] = float(dropped)
            metrics["dynamic_sampling/rounds"] = float(rounds)
        groups = [i // n for i in range(len(records))]
        return RolloutBatch(iteration, version, records, np.asarray(rewards, dtype=np.float64), groups, metrics,
                            prompts.state_dict(), reward_seconds)

    return produce
