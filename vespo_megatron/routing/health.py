"""Replay health counters, accumulated on device without synchronisation and read once per step.

Per MoE layer (trace column) c, over the router rows that carry a trace row (pads and filler rows excluded):
    replayed_c  = rows routed by the trace
    fallback_c  = rows whose trace entry is missing (−1 / the missing code): routed live
    differ_c    = replayed rows whose replayed expert set ≠ the live top-k set of the same router scores
Metrics: rows_replayed = Σ_c replayed_c, rows_fallback = Σ_c fallback_c, differ_frac = Σ differ / Σ replayed and
differ_frac/layer_<hf index> = differ_c / replayed_c. Every (token, layer) is routed on exactly one rank, so a sum
over all ranks (``group``) gives the global counts.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

PREFIX = "routing_replay"


def same_set(replayed: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """[T] bool: the k distinct ids of each row of ``replayed`` [T, k] are the ids of ``live`` [T, k]."""
    return (replayed.unsqueeze(2) == live.unsqueeze(1)).any(dim=2).all(dim=1)


class ReplayHealth:
    """Counters [num_layers, 3] (replayed, fallback, differ) for the trace columns of one model."""

    def __init__(self, hf_layers: Sequence[int]) -> None:
        self.hf_layers = tuple(hf_layers)
        self._counts: Optional[torch.Tensor] = None

    def add(self, column: int, replay: torch.Tensor, fallback: torch.Tensor, differ: torch.Tensor) -> None:
        """Add masks [T] bool of one router call (rows replayed, rows fallen back, replayed rows that differ)."""
        if self._counts is None or self._counts.device != replay.device:
            self._counts = torch.zeros(len(self.hf_layers), 3, dtype=torch.int64, device=replay.device)
        self._counts[column] += torch.stack([replay.sum(), fallback.sum(), (differ & replay).sum()])

    def counts(self, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
        """[num_layers, 3] int64 on CPU, summed over ``group`` when given (a collective: call it on every rank)."""
        counts = self._counts if self._counts is not None else torch.zeros(len(self.hf_layers), 3, dtype=torch.int64)
        if group is not None:
            counts = counts.clone()
            dist.all_reduce(counts, group=group)
        return counts.cpu()

    def pop(self, group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
        """The metrics of everything counted since the last pop (see the module docstring); resets the counters."""
        counts = self.counts(group)
        self._counts = None
        replayed, fallback, differ = counts.sum(dim=0).tolist()
        out = {f"{PREFIX}/rows_replayed": float(replayed), f"{PREFIX}/rows_fallback": float(fallback),
               f"{PREFIX}/differ_frac": differ / replayed if replayed else 0.0}
        for layer, (rep, _, diff) in zip(self.hf_layers, counts.tolist()):
            out[f"{PREFIX}/differ_frac/layer_{layer}"] = diff / rep if rep else 0.0
        return out
