"""One rollout sample as the packer takes it (numpy arrays; from torch zero-copy with ``tensor.numpy()``).

Accepted dtypes (anything else is a ValueError naming the sample and the field; arrays must be C-contiguous):

* ``prompt`` [P] int32|int64, P ≥ 1 (the first token has no prediction, so a response needs a prompt before it).
* ``response`` [R] int32|int64, R ≥ 0.
* ``rollout_logprobs`` [m] float32|float64, finite and ≤ 0: log μ(response token j | ...) for j < m. Aligned by
  position from the first response token; m < R leaves the last R − m tokens without a value (masked, counted);
  m > R is an error unless the packer is called with ``truncate=True`` (extra values dropped, counted).
* ``loss_mask`` [R] bool|uint8 in {0, 1}, per response token; None means all ones.
* ``routing`` [P + R − 1, layers, topk] uint8|uint16|int32: SGLang's routed experts, row p from the forward whose
  input is token p; the packer appends one filler row (ids 0..topk−1) for the last token. Same dtype, layers and
  topk in every sample of a batch.
* ``advantage``, ``reward``: optional per-sample scalars, carried per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Sample:
    """A variable-length rollout sample; see the module docstring for shapes and dtypes."""

    prompt: np.ndarray
    response: np.ndarray
    rollout_logprobs: np.ndarray | None = None
    loss_mask: np.ndarray | None = None
    routing: np.ndarray | None = None
    advantage: float | None = None
    reward: float | None = None


def resolve_sample_ids(samples: Sequence[Sample], sample_ids: Sequence[int] | None) -> np.ndarray:
    """[S] int64 ids naming the samples in errors and in ``PackedBatch.sample_ids`` (default 0..S−1)."""
    if sample_ids is None:
        return np.arange(len(samples), dtype=np.int64)
    ids = np.asarray(sample_ids, dtype=np.int64)
    if ids.shape != (len(samples),):
        raise ValueError(f"sample_ids: expected {len(samples)} ids, got shape {ids.shape}")
    return ids


def sequence_scalars(samples: Sequence[Sample], ids: np.ndarray, field: str) -> np.ndarray | None:
    """[S] float64 of a per-sample scalar field (advantage or reward), or None when no sample has one."""
    values = [getattr(s, field) for s in samples]
    present = [v is not None for v in values]
    if not any(present):
        return None
    if not all(present):
        i = present.index(False)
        raise ValueError(f"sample {ids[i]}: {field}: missing while other samples have one")
    out = np.array(values, dtype=np.float64)
    bad = ~np.isfinite(out)
    if bad.any():
        raise ValueError(f"sample {ids[int(np.argmax(bad))]}: {field}: not finite")
    return out
