"""The C++ packer (``vespo_megatron._packer``, csrc/packer.cpp) behind the API of ``reference``.

Inputs are read in place (no copy) and outputs are fresh numpy arrays; from/to torch with ``tensor.numpy()`` and
``torch.from_numpy``. The copies run with the GIL released.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vespo_megatron import _packer
from vespo_megatron.packing.batch import PackedBatch, PackStats, check_unpack_values, split_by_sequence
from vespo_megatron.packing.layout import check_parallel
from vespo_megatron.packing.sample import Sample, resolve_sample_ids, sequence_scalars


def pack(
    samples: Sequence[Sample],
    cp: int = 1,
    sp: int = 1,
    tail_align: int = 1,
    truncate: bool = False,
    sample_ids: Sequence[int] | None = None,
) -> PackedBatch:
    """Pack ``samples`` (one micro-batch, in order) for context-parallel size cp and sequence-parallel size sp."""
    check_parallel(cp, sp, tail_align)
    ids = resolve_sample_ids(samples, sample_ids)
    out = _packer.pack(
        [s.prompt for s in samples],
        [s.response for s in samples],
        [s.loss_mask for s in samples],
        [s.rollout_logprobs for s in samples],
        [s.routing for s in samples],
        ids,
        cp,
        sp,
        tail_align,
        truncate,
    )
    stats = PackStats(**out.pop("stats"))
    return PackedBatch(
        cp=cp,
        sp=sp,
        tail_align=tail_align,
        sample_ids=ids,
        advantages=sequence_scalars(samples, ids, "advantage"),
        rewards=sequence_scalars(samples, ids, "reward"),
        stats=stats,
        **out,
    )


def unpack(batch: PackedBatch, values: np.ndarray) -> list[np.ndarray]:
    """Per-token outputs [cp, t, ...] (e.g. training log-probs, entropy) -> per-sequence [n_i, ...], batch order."""
    check_unpack_values(batch, values)
    flat = _packer.unpack(values, batch.seq_lens, batch.cp, batch.sp, batch.tail_align)
    return split_by_sequence(flat, batch.cu_seqlens)


def set_num_threads(num_threads: int) -> None:
    """Threads the C++ packer may use (default: the hardware threads); the output does not depend on it."""
    _packer.set_num_threads(num_threads)


def get_num_threads() -> int:
    return _packer.get_num_threads()
