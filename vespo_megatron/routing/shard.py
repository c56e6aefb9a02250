"""Each rank's piece of a routing trace: its CP/SP token slots (the tokens' own index map) and its stage's layers.

The trace of a micro-batch is a stream of per-sequence routing rows (:class:`~vespo_megatron.routing.trace.
PackedTrace`: rows_i = n_i − 1 from SGLang, or n_i when recorded for every token). Rows go through exactly the map of
the tokens — :func:`vespo_megatron.packing.layout.source_index` with segments [0, rows_i) — then the SP slice of the
local pack, then the columns of this pipeline stage's MoE layers. A slot without a row (every pad; the last token of
an SGLang sample) gets the packer's filler row 0..k−1: k distinct valid ids, as the all-to-all dispatcher needs.

Shapes: T = t/sp local router rows, L_local = MoE layers of this stage, k = topk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vespo_megatron.packing.batch import PackedBatch
from vespo_megatron.packing.layout import PackLayout, build_layout, source_index, take
from vespo_megatron.packing.reference import filler_row
from vespo_megatron.routing.trace import PackedTrace


@dataclass(frozen=True)
class LocalTrace:
    """One rank's routing rows for one micro-batch.

    ``ids`` [T, L_local, k] (trace storage dtype; code ``num_experts`` = missing, routed live); ``index`` [T] int64,
    the trace row of each slot, −1 where the slot holds the filler; ``layer_columns`` the trace columns (MoE layers)
    in ``ids``.
    """

    ids: np.ndarray
    index: np.ndarray
    layer_columns: tuple[int, ...]
    num_experts: int

    @property
    def has_row(self) -> np.ndarray:
        """[T] bool, slots whose routing comes from the trace (not the filler)."""
        return self.index >= 0


def row_index(trace: PackedTrace, layout: PackLayout) -> np.ndarray:
    """[cp, t] int64: trace row of every local slot of every CP rank, −1 where there is none."""
    return rows_index(trace.rows, layout)


def rows_index(rows: np.ndarray, layout: PackLayout) -> np.ndarray:
    """:func:`row_index` from the rows per sequence [S] alone."""
    n = layout.seq_lens
    if rows.shape != n.shape:
        raise ValueError(f"trace has {rows.size} samples, the micro-batch layout {n.size} sequences")
    bad = (rows != n) & (rows != n - 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"sequence {i}: {rows[i]} routing rows for {n[i]} tokens (expected {n[i] - 1} or {n[i]})")
    return source_index(layout, np.zeros_like(rows), rows)


def shard(
    trace: PackedTrace, layout: PackLayout, cp_rank: int, sp_rank: int, layer_columns: Sequence[int]
) -> LocalTrace:
    """The rows of CP rank ``cp_rank``, SP rank ``sp_rank`` (its contiguous slice), MoE columns ``layer_columns``."""
    columns = tuple(int(c) for c in layer_columns)
    if any(not 0 <= c < trace.spec.num_moe_layers for c in columns):
        raise ValueError(f"layer columns {columns} outside [0, {trace.spec.num_moe_layers})")
    if not (0 <= cp_rank < layout.cp and 0 <= sp_rank < layout.sp):
        raise ValueError(f"rank (cp {cp_rank}, sp {sp_rank}) outside the layout's cp={layout.cp}, sp={layout.sp}")
    lo, hi = layout.sp_bounds[sp_rank], layout.sp_bounds[sp_rank + 1]
    index = row_index(trace, layout)[cp_rank, lo:hi]
    spec = trace.spec
    ids = take(trace.ids, index, filler_row(spec.num_moe_layers, spec.topk, trace.ids.dtype))
    if columns != tuple(range(trace.spec.num_moe_layers)):
        ids = ids[:, list(columns)]
    return LocalTrace(ids, index, columns, trace.spec.num_experts)


def local_index(rows: np.ndarray, batch: PackedBatch, cp_rank: int, sp_rank: int) -> np.ndarray:
    """[T] trace row of every slot of CP rank ``cp_rank``, SP rank ``sp_rank`` of a packer micro-batch whose
    sequences have ``rows`` [S] trace rows each (the ``index`` of its :func:`batch_shard`)."""
    layout = build_layout(batch.seq_lens, batch.cp, batch.sp, batch.tail_align)
    lo, hi = layout.sp_bounds[sp_rank], layout.sp_bounds[sp_rank + 1]
    return rows_index(np.asarray(rows, np.int64), layout)[cp_rank, lo:hi]


def batch_shard(
    trace: PackedTrace, batch: PackedBatch, cp_rank: int, sp_rank: int, layer_columns: Sequence[int]
) -> LocalTrace:
    """:func:`shard` for a packer micro-batch: ``trace`` is indexed by sample id (``batch.sample_ids``)."""
    layout = build_layout(batch.seq_lens, batch.cp, batch.sp, batch.tail_align)
    return shard(trace.select(batch.sample_ids), layout, cp_rank, sp_rank, layer_columns)


def unshard(pieces: Sequence[LocalTrace], num_rows: int, num_layers: int) -> np.ndarray:
    """Inverse of :func:`shard` over pieces covering every (row, layer): -> ids [num_rows, num_layers, k].

    Raises if a (row, layer) is covered by no piece, or by pieces that disagree.
    """
    if not pieces:
        raise ValueError("unshard needs at least one piece")
    out = np.zeros((num_rows, num_layers) + pieces[0].ids.shape[2:], pieces[0].ids.dtype)
    hits = np.zeros((num_rows, num_layers), np.int64)
    for piece in pieces:
        has = piece.has_row
        where = np.ix_(piece.index[has], list(piece.layer_columns))
        values = piece.ids[has]  # [m, L_local, k]
        if ((hits[where] > 0) & (out[where] != values).any(axis=2)).any():
            raise ValueError("pieces disagree on a (row, layer) they share")
        out[where] = values
        hits[where] += 1
    if (hits == 0).any():
        row, layer = divmod(int(np.argmax(hits.reshape(-1) == 0)), num_layers)
        raise ValueError(f"no piece covers trace row {row}, layer column {layer}")
    return out
