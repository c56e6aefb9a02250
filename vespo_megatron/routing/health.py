"""Replay health counters: row counts on the host per micro-batch, differ counts on device per router call (no
synchronisation in the forward; summed when read, once per step).

Per MoE layer (trace column) c, over the router rows that carry a trace row (pads and filler rows excluded):
    replayed_c  = rows routed by the trace
    fallback_c  = rows whose trace entry is missing (−1 / the missing code): routed live
    differ_c    = replayed rows whose replayed expert set is not a top-k set of the live router scores
Metrics: rows_replayed = Σ_c replayed_c, rows_fallback = Σ_c fallback_c, differ_frac = Σ differ / Σ replayed and
differ_frac/layer_<hf index> = differ_c / replayed_c. Every (token, layer) is routed on exactly one rank, so a sum
over all ranks (``group``) gives the global counts.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

PREFIX = "routing_replay"


def differ_rows(
    scores: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, live_ids: torch.Tensor, live_values: torch.Tensor,
    grouped: bool,
) -> torch.Tensor:
    """[T] bool: the replayed set ``ids`` [T, k] (``values`` = scores at ids) is not a live top-k set.

    Plain top-k: the set is a top-k set iff its smallest score reaches the k-th largest (``live_values`` sorted
    descending), which also treats an equally scored choice at a tie as live. Group-limited top-k (``grouped``):
    the set must equal ``live_ids`` (compared as sets, k distinct ids each).
    """
    if not grouped:
        return values.min(dim=1).values < live_values[:, -1]
    hits = torch.zeros(scores.shape, dtype=torch.int8, device=ids.device)
    return hits.scatter_(1, ids, 1).gather(1, live_ids).sum(dim=1) != ids.shape[1]


class ReplayHealth:
    """The counters of the trace columns (MoE layers) of one model."""

    def __init__(self, hf_layers: Sequence[int]) -> None:
        self.hf_layers = tuple(hf_layers)
        self._rows = np.zeros((len(self.hf_layers), 2), np.int64)  # replayed, fallback
        self._differ: list[list[torch.Tensor]] = [[] for _ in self.hf_layers]

    def add_rows(self, columns: Sequence[int], replayed: np.ndarray, fallback: np.ndarray) -> None:
        """Add the rows of one micro-batch, per column: [len(columns)] replayed and fallen-back counts."""
        self._rows[list(columns), 0] += replayed
        self._rows[list(columns), 1] += fallback

    def add_differ(self, column: int, differ: torch.Tensor) -> None:
        """Add one router call's count (0-dim tensor) of replayed rows whose set differs from the live top-k."""
        self._differ[column].append(differ)

    def counts(self, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
        """[num_layers, 3] int64 (replayed, fallback, differ) on CPU, summed over ``group`` when given (a
        collective: call it on every rank)."""
        differ = [int(torch.stack(d).sum()) if d else 0 for d in self._differ]
        counts = torch.cat([torch.from_numpy(self._rows), torch.tensor(differ, dtype=torch.int64)[:, None]], dim=1)
        if group is not None:
            dist.all_reduce(counts, group=group)
        return counts

    def pop(self, group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
        """The metrics of everything counted since the last pop (see the module docstring); resets the counters."""
        counts = self.counts(group)
        self._rows[:] = 0
        self._differ = [[] for _ in self.hf_layers]
        replayed, fallback, differ = counts.sum(dim=0).tolist()
        out = {f"{PREFIX}/rows_replayed": float(replayed), f"{PREFIX}/rows_fallback": float(fallback),
               f"{PREFIX}/differ_frac": differ / replayed if replayed else 0.0}
        for layer, (rep, _, diff) in zip(self.hf_layers, counts.tolist()):
            out[f"{PREFIX}/differ_frac/layer_{layer}"] = diff / rep if rep else 0.0
        return out
