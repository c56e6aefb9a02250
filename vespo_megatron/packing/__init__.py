"""Rollout samples -> Megatron packed micro-batches (THD, per-sequence pad to 2·cp, CP zig-zag, SP slices) and back.

* ``layout``: the index maps (the one place the layout math lives; routing-trace sharding reuses it).
* ``reference``: numpy implementation; ``native``: the C++ packer with the same API and bit-identical output.
* ``planning``: split samples into micro-batches per data-parallel rank.

Per-token arrays are indexed by the token itself: slot p of a sequence holds token p, its rollout log-prob
log μ(token p | tokens < p), its loss-mask bit and the routing row of the forward whose input is token p; the
Megatron side shifts labels (logits at p − 1 score token p).
"""
from vespo_megatron.packing.batch import PackedBatch, PackStats, RankShard, restore_order
from vespo_megatron.packing.layout import PackLayout, build_layout, scatter, source_index, take
from vespo_megatron.packing.native import pack, unpack
from vespo_megatron.packing.planning import MicroBatchPlan, plan_micro_batches
from vespo_megatron.packing.sample import Sample

__all__ = [
    "MicroBatchPlan",
    "PackLayout",
    "PackStats",
    "PackedBatch",
    "RankShard",
    "Sample",
    "build_layout",
    "pack",
    "plan_micro_batches",
    "restore_order",
    "scatter",
    "source_index",
    "take",
    "unpack",
]
