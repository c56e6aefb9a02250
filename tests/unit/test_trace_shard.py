"""Trace shards follow the tokens' index map (CP zig-zag, SP slice, stage layers); pack -> shard -> unshard."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vespo_megatron.packing.layout import build_layout
from vespo_megatron.packing.reference import pack as pack_samples
from vespo_megatron.packing.sample import Sample
from vespo_megatron.routing.shard import batch_shard, shard, unshard
from vespo_megatron.routing.trace import TraceSpec, pack


def random_trace(rng: np.random.Generator, rows: list[int], spec: TraceSpec) -> list[np.ndarray]:
    """Per sample [rows_i, num_moe_layers, k] with k distinct ids per row."""
    keys = rng.random((sum(rows), spec.num_moe_layers, spec.num_experts))
    ids = np.argsort(keys, axis=2)[:, :, : spec.topk].astype(np.int32)
    return np.split(ids, np.cumsum(rows)[:-1])


def test_hand_worked_cp2_sp2_layout():
    # sequences of 3 and 5 tokens, SGLang rows 2 and 4; cp=2 pads them to 4 and 8 (chunks of 1 and 2 tokens);
    # CP rank 0 keeps chunks 0 and 3: seq0 positions 0,3 and seq1 positions 0,1,6,7; rank 1: seq0 1,2 / seq1 2..5.
    # Trace rows: 0,1 = seq0 positions 0,1; 2..5 = seq1 positions 0..3. Filler: seq0 position 2 (last token), pads.
    spec = TraceSpec(2, (0, 1), 8, 2)
    trace = pack(random_trace(np.random.default_rng(0), [2, 4], spec), spec)
    layout = build_layout(np.array([3, 5]), cp=2, sp=2)
    expected_index = {(0, 0): [0, -1, 2], (0, 1): [3, -1, -1], (1, 0): [1, -1, 4], (1, 1): [5, -1, -1]}
    for (cp_rank, sp_rank), index in expected_index.items():
        local = shard(trace, layout, cp_rank, sp_rank, (0, 1))
        np.testing.assert_array_equal(local.index, index)
        for slot, row in enumerate(index):
            np.testing.assert_array_equal(local.ids[slot], trace.ids[row] if row >= 0 else [[0, 1], [0, 1]])
    # a stage owning only the second MoE layer gets that column
    local = shard(trace, layout, 1, 0, (1,))
    np.testing.assert_array_equal(local.ids[:, 0], np.stack([trace.ids[1, 1], [0, 1], trace.ids[4, 1]]))


def test_full_rows_cover_the_last_token():
    spec = TraceSpec(1, (0,), 4, 2)
    trace = pack(random_trace(np.random.default_rng(1), [3], spec), spec)  # rows = n: recorded for every token
    local = shard(trace, build_layout(np.array([3]), cp=1, sp=1, tail_align=4), 0, 0, (0,))
    np.testing.assert_array_equal(local.index, [0, 1, 2, -1])


def test_rows_must_match_the_sequence_lengths():
    spec = TraceSpec(1, (0,), 4, 2)
    trace = pack(random_trace(np.random.default_rng(2), [2, 2], spec), spec)
    with pytest.raises(ValueError, match="sequence 1: 2 routing rows for 5 tokens"):
        shard(trace, build_layout(np.array([3, 5])), 0, 0, (0,))
    with pytest.raises(ValueError, match="2 samples, the micro-batch layout 1"):
        shard(trace, build_layout(np.array([3])), 0, 0, (0,))


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    full_rows=st.lists(st.booleans(), min_size=5, max_size=5),
    cp=st.sampled_from([1, 2, 3]),
    sp=st.sampled_from([1, 2, 4]),
    tail_align=st.sampled_from([1, 3]),
    num_layers=st.integers(1, 4),
    topk=st.integers(1, 3),
    extra_experts=st.integers(0, 6),
    stages=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_pack_shard_unshard_round_trip(lens, full_rows, cp, sp, tail_align, num_layers, topk, extra_experts,
                                       stages, seed):
    rng = np.random.default_rng(seed)
    spec = TraceSpec(num_layers, tuple(range(num_layers)), topk + extra_experts, topk)
    rows = [n if full else n - 1 for n, full in zip(lens, full_rows)]
    trace = pack(random_trace(rng, rows, spec), spec)
    layout = build_layout(np.array(lens), cp=cp, sp=sp, tail_align=tail_align)
    cuts = np.sort(rng.integers(0, num_layers + 1, size=min(stages, num_layers) - 1))
    stage_columns = [tuple(c) for c in np.split(np.arange(num_layers), cuts)]
    row_start = np.concatenate([[0], np.cumsum(rows)])
    pieces = []
    for cp_rank in range(cp):
        for sp_rank in range(sp):
            lo, hi = layout.sp_bounds[sp_rank], layout.sp_bounds[sp_rank + 1]
            for columns in stage_columns:
                local = shard(trace, layout, cp_rank, sp_rank, columns)
                assert local.ids.shape == (hi - lo, len(columns), topk)
                has = local.has_row
                # a row sits where its token sits: same sequence, same position
                seq = layout.seq_index[cp_rank, lo:hi][has]
                np.testing.assert_array_equal(local.index[has] - row_start[seq], layout.position[cp_rank, lo:hi][has])
                # every slot, pad or not, holds k distinct valid ids; slots without a row hold the filler
                ordered = np.sort(local.ids, axis=2)
                assert (ordered[..., 1:] != ordered[..., :-1]).all() and (local.ids < spec.num_experts).all()
                assert (local.ids[~has] == np.arange(topk)).all()
                pieces.append(local)
    np.testing.assert_array_equal(unshard(pieces, int(row_start[-1]), num_layers), trace.ids)


def test_shards_equal_the_packers_routing_rows():
    # the packer (reference implementation) carries SGLang rows through the same maps: both must agree slot by slot
    rng = np.random.default_rng(3)
    spec = TraceSpec(3, (0, 1, 2), 8, 2)
    lens = [5, 2, 9, 4]
    rows = random_trace(rng, [n - 1 for n in lens], spec)
    samples = [Sample(prompt=np.arange(2), response=np.arange(n - 2), routing=r.astype(np.uint8))
               for n, r in zip(lens, rows)]
    trace = pack(rows, spec)
    for cp, sp in ((1, 2), (2, 1), (2, 2)):
        batch = pack_samples(samples, cp=cp, sp=sp, sample_ids=[0, 1, 2, 3])
        for cp_rank in range(cp):
            for sp_rank in range(sp):
                local = batch_shard(trace, batch, cp_rank, sp_rank, (0, 1, 2))
                np.testing.assert_array_equal(local.ids, batch.shard(cp_rank, sp_rank).routing)


def test_unshard_rejects_missing_and_conflicting_pieces():
    spec = TraceSpec(2, (0, 1), 4, 2)
    trace = pack(random_trace(np.random.default_rng(4), [3, 5], spec), spec)
    layout = build_layout(np.array([4, 6]), cp=1, sp=2)
    pieces = [shard(trace, layout, 0, s, (0, 1)) for s in range(2)]
    with pytest.raises(ValueError, match="no piece covers"):
        unshard(pieces[:1], 8, 2)
    other = shard(pack(random_trace(np.random.default_rng(5), [3, 5], spec), spec), layout, 0, 0, (0, 1))
    with pytest.raises(ValueError, match="disagree"):
        unshard(pieces + [other], 8, 2)
