"""The packer's output is the layout Megatron-Core expects: packed (THD) log-probs at CP1 and at TP2 with sequence
parallelism equal the UNPACKED reference forward (each sequence alone, no packing), per token, in fp64."""
from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state

from tests.distributed.parallel_cases import initial_weights, make_samples, micro_batches, per_sample_logp
from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.megatron.model import build_model
from vespo_megatron.megatron.parallel import init_parallel, spawn
from vespo_megatron.megatron.step import old_log_probs
from vespo_megatron.megatron.weights import load_global

FAMILY, DTYPE = "qwen3_moe", torch.float64


def _unpacked_reference(rank: int, samples) -> tuple[dict, dict]:
    """(weights, sample id -> log-probs of its response tokens) from per-sequence forwards without packing."""
    init_parallel()
    weights = initial_weights(FAMILY, DTYPE)
    model = build_model(tiny_hf_config(FAMILY), dtype=DTYPE)
    load_global(model, weights)
    out = {}
    with torch.no_grad():
        for sid, s in enumerate(samples):
            ids = torch.cat([torch.from_numpy(s.prompt), torch.from_numpy(s.response)])[None]
            logits = model(ids, torch.arange(ids.shape[1])[None], None)[0]
            logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
            out[sid] = logp[len(s.prompt) - 1:]
    return weights, out


def _packed(rank: int, layout: dict, weights: dict, samples, n_micro: int) -> dict:
    init_parallel(**layout)
    model = build_model(tiny_hf_config(FAMILY), dtype=DTYPE)
    load_global(model, weights)
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    mbs = micro_batches(samples, n_micro, tp, tp_rank, 1, 0)
    return per_sample_logp(mbs, old_log_probs(model, mbs))


@pytest.fixture(scope="module")
def reference():
    samples = make_samples(6, seed=5)
    weights, logp = spawn(_unpacked_reference, 1, samples)[0]
    return samples, weights, logp


@pytest.mark.parametrize("layout, world", [({}, 1), (dict(tp=2), 2)], ids=["cp1", "tp2-sp"])
def test_packed_equals_unpacked(reference, layout, world):
    samples, weights, ref = reference
    results = spawn(_packed, world, layout, weights, samples, 2)
    for got in results:  # every TP rank computes the same log-probs
        assert sorted(got) == list(range(len(samples)))
        for sid, lp in ref.items():
            assert got[sid].shape == lp.shape
            assert torch.allclose(got[sid], lp, atol=1e-10, rtol=0), sid
