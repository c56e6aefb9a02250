"""Per-rank delivery of a step's batch over 4 gloo ranks (data parallel 2 × tensor parallel 2, two stages' MoE
columns): each rank receives exactly its own samples and its SP slice of its stage's routing trace (equal to what
the whole-batch path computes: samples, routing ids and slot index), and at most 1.05× the bytes of its own share
(the pickled whole batch every rank used to receive is reported beside it)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from vespo_megatron.packing import pack
from vespo_megatron.packing.sample import Sample
from vespo_megatron.routing.shard import batch_shard
from vespo_megatron.routing.trace import TraceSpec
from vespo_megatron.routing.trace import pack as pack_trace
from vespo_megatron.train.delivery import RankPlace, local_routing, plan_shares, share_bytes

pytestmark = pytest.mark.timeout(600)

SPEC = TraceSpec(num_hf_layers=4, moe_layers=(0, 2, 3), num_experts=8, topk=2)
PLACES = [RankPlace(0, 0, (0, 1)), RankPlace(0, 1, (0, 1)), RankPlace(1, 0, (2,)), RankPlace(1, 1, (2,))]
DP, TP, MINIS, MBS = 2, 2, 2, 2


def make_batch(seed: int = 0, num: int = 64):
    """Samples (tokens, rollout log-probs, advantage) and their SGLang routing trace (rows = tokens − 1)."""
    rng = np.random.default_rng(seed)
    samples, routing = [], []
    for _ in range(num):
        prompt, response = rng.integers(0, 32, rng.integers(8, 64)), rng.integers(0, 32, rng.integers(16, 128))
        samples.append(Sample(prompt=prompt, response=response,
                              rollout_logprobs=-rng.random(len(response)).astype(np.float32),
                              advantage=float(rng.normal())))
        rows = len(prompt) + len(response) - 1
        routing.append(np.stack([rng.permutation(SPEC.num_experts)[:SPEC.topk] for _ in range(rows * 3)])
                       .reshape(rows, 3, SPEC.topk).astype(np.int32))
    return samples, pack_trace(routing, SPEC)


def _rank(rank: int) -> dict:
    from vespo_megatron.train.delivery import BatchDelivery

    delivery = BatchDelivery(PLACES[rank], SPEC.topk)
    shares = None
    whole = 0
    if rank == 0:
        samples, trace = make_batch()
        shares = [plan_shares(samples, trace, MINIS, DP, TP, MBS, place) for place in delivery.places]
        whole = len(pickle.dumps((samples, trace)))
    mine = delivery.scatter(shares)
    return {"received": delivery.received_bytes, "share": share_bytes(mine), "whole": whole, "mine": mine}


def test_each_rank_receives_only_its_share():
    from vespo_megatron.megatron.parallel import spawn

    results = spawn(_rank, 4)
    samples, trace = make_batch()
    position = {id(s): i for i, s in enumerate(samples)}
    whole = results[0]["whole"]
    for rank, (place, got) in enumerate(zip(PLACES, results)):
        want = plan_shares(samples, trace, MINIS, DP, TP, MBS, place)
        assert len(got["mine"]) == len(want) == MINIS
        for mini_got, mini_want in zip(got["mine"], want):
            assert (mini_got.global_tokens, mini_got.global_seqs) == (mini_want.global_tokens, mini_want.global_seqs)
            assert len(mini_got.micros) == len(mini_want.micros)
            for micro_got, micro_want in zip(mini_got.micros, mini_want.micros):
                for a, b in zip(micro_got.samples, micro_want.samples, strict=True):
                    assert np.array_equal(a.prompt, b.prompt) and np.array_equal(a.response, b.response)
                    assert np.array_equal(a.rollout_logprobs, b.rollout_logprobs) and a.advantage == b.advantage
                np.testing.assert_array_equal(micro_got.routing, micro_want.routing)
                assert micro_got.routing.shape[1] == len(place.layer_columns)
                packed = pack(micro_got.samples, cp=1, sp=TP)
                local = local_routing(micro_got.routing, micro_got.samples, packed, place.cp_rank, place.tp_rank,
                                      place.layer_columns, SPEC.num_experts)
                ids = [position[id(s)] for s in micro_want.samples]
                reference = batch_shard(trace, pack(micro_want.samples, cp=1, sp=TP, sample_ids=ids), 0,
                                        place.tp_rank, place.layer_columns)
                np.testing.assert_array_equal(local.index, reference.index)
                np.testing.assert_array_equal(local.ids, reference.ids)
        if rank:
            ratio = got["received"] / got["share"]
            print(f"rank {rank}: received {got['received']} B, own share {got['share']} B ({ratio:.3f}x), "
                  f"whole batch pickled {whole} B")
            assert ratio <= 1.05, f"rank {rank} received {ratio:.3f}x its own share"
            assert got["received"] < whole / 2
