"""Split samples into micro-batches per data-parallel rank, by token budget (dynamic batching) or by count.

Cost of sample i = P_i, its token count padded to a multiple of 2·cp (what it occupies in the packed micro-batch,
before the CP split). Deterministic greedy balancing (longest-processing-time first): samples in order of cost
descending (index ascending on ties) go to the lightest bin (lowest bin index on ties) that has room.

1. Samples -> DP ranks: LPT over dp bins (by count, or by budget with ``equal_counts``: exactly N/dp samples each).
2. Each rank's samples -> k micro-batches, the same k on every rank:
   * budget: k starts at max_d ceil(load_d / max_tokens) and grows until LPT keeps every micro-batch within budget;
   * count: k = ceil((N/dp) / micro_batch_size), sizes as even as possible (each ≤ micro_batch_size).
With ``equal_counts`` every rank holds N/dp ≥ k samples (a sample alone always fits the budget, so k ≤ N/dp), hence
no micro-batch is empty: every rank runs k non-empty micro-batches (what expert-parallel all-to-alls need).
A micro-batch lists its samples in ascending index; a rank's micro-batches are ordered by their first sample (empty
ones, possible only when a rank has fewer samples than k, come last).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class MicroBatchPlan:
    """``micro_batches[d][m]``: sample indices of micro-batch m on data-parallel rank d."""

    micro_batches: list[list[list[int]]]
    costs: np.ndarray  # [N] int64, padded token count of each sample

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches[0])

    def tokens(self) -> np.ndarray:
        """[dp, num_micro_batches] int64 padded tokens per micro-batch."""
        return np.array([[int(self.costs[mb].sum()) for mb in rank] for rank in self.micro_batches], np.int64)


def _lpt(items: list[int], costs: np.ndarray, capacities: Sequence[int | None]) -> list[list[int]]:
    """Greedy LPT of ``items`` into len(capacities) bins (capacity = max items, None = unbounded)."""
    bins: list[list[int]] = [[] for _ in capacities]
    heap = [(0, b) for b in range(len(capacities)) if capacities[b] != 0]
    heapq.heapify(heap)
    for i in sorted(items, key=lambda i: (-int(costs[i]), i)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        if capacities[b] is None or len(bins[b]) < capacities[b]:
            heapq.heappush(heap, (load + int(costs[i]), b))
    return bins


def _even(total: int, parts: int) -> list[int]:
    return [total // parts + (b < total % parts) for b in range(parts)]


def _ordered(bins: list[list[int]]) -> list[list[int]]:
    return sorted((sorted(b) for b in bins), key=lambda b: (not b, b[0] if b else 0))


def plan_micro_batches(
    seq_lens: Sequence[int] | np.ndarray,
    dp: int = 1,
    *,
    max_tokens: int | None = None,
    micro_batch_size: int | None = None,
    cp: int = 1,
    equal_counts: bool = False,
) -> MicroBatchPlan:
    """Plan micro-batches for samples of ``seq_lens`` [N] tokens; give exactly one of max_tokens / micro_batch_size.

    ``equal_counts`` (budget mode): N/dp samples per rank (N divisible by dp), so no micro-batch is empty."""
    if (max_tokens is None) == (micro_batch_size is None):
        raise ValueError("give exactly one of max_tokens (dynamic batching) and micro_batch_size (by count)")
    for name, value in (("dp", dp), ("cp", cp), ("max_tokens", max_tokens), ("micro_batch_size", micro_batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    n = np.asarray(seq_lens, dtype=np.int64)
    if n.ndim != 1:
        raise ValueError(f"seq_lens must be 1-D, got shape {n.shape}")
    if (n < 0).any():
        i = int(np.argmax(n < 0))
        raise ValueError(f"sample {i}: length {int(n[i])} < 0")
    if n.size < dp:
        raise ValueError(f"{n.size} samples cannot fill {dp} data-parallel ranks")
    costs = -(-n // (2 * cp)) * (2 * cp)
    items = list(range(n.size))

    if (micro_batch_size is not None or equal_counts) and n.size % dp:
        raise ValueError(f"{n.size} samples are not divisible by dp={dp}")
    if micro_batch_size is not None:
        per_rank = n.size // dp
        k = -(-per_rank // micro_batch_size)
        ranks = _lpt(items, costs, [per_rank] * dp)
        return MicroBatchPlan([_ordered(_lpt(r, costs, _even(per_rank, k))) for r in ranks], costs)

    too_big = costs > max_tokens
    if too_big.any():
        i = int(np.argmax(too_big))
        raise ValueError(f"sample {i}: {int(costs[i])} padded tokens exceed max_tokens={max_tokens}")
    ranks = _lpt(items, costs, [n.size // dp if equal_counts else None] * dp)
    k = max(1, max(-(-int(costs[r].sum()) // max_tokens) for r in ranks))
    while True:
        plan = [_lpt(r, costs, [None] * k) for r in ranks]
        if all(int(costs[mb].sum()) <= max_tokens for rank in plan for mb in rank):
            return MicroBatchPlan([_ordered(rank) for rank in plan], costs)
        k += 1
