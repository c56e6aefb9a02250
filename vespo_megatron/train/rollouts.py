"""Where a training step's rollouts come from: synchronous (generated at the current policy) or fully asynchronous
(a producer thread generates ahead, at most ``max_lag`` policy versions behind the trainer).

A :class:`RolloutBatch` is the global batch of one step: prompt-major records (``n`` samples per prompt), the rewards
of the task and the policy version whose weights the engine held when generation started.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from vespo_megatron.packing.sample import Sample
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


def make_producer(client: Any, task: Any, *, rollout_batch_size: int, n: int, sampling: dict[str, Any], seed: int,
                  routing: bool) -> Produce:
    """Produce(iteration, version): prompts of the task (seeded by iteration) -> engine -> rewards."""

    def produce(iteration: int, version: int) -> RolloutBatch:
        prompts = task.prompts(rollout_batch_size, seed=seed * 100_003 + iteration)
        records = client.generate(prompts, sampling, samples_per_prompt=n, seed=seed + iteration,
                                  return_routed_experts=routing, rid_prefix=f"it{iteration}")
        rewards = task.rewards([r.prompt_ids for r in records], [r.response_ids for r in records])
        groups = [i // n for i in range(len(records))]
        return RolloutBatch(iteration, version, records, rewards, groups)

    return produce
