"""The same 1-rank numbers on every megatron-core release line (fp64, ≤ 1e-12; sigmoid gates: see CASES).

Two references, built exactly as the tests that compare every parallel layout against them build theirs:
  * parallel exactness (test_parallel_exactness.py): VESPO loss, per-token log-probs and every gradient of the 1-rank
    run over 8 samples;
  * routing replay (test_replay.py, softmax top-k and sigmoid + expert bias): model A's live experts, and B (A with
    perturbed routers) replaying A's trace: per-token log-probs and the router-weight gradients of Σ log-probs.

``scripts/test.sh`` runs the suite on 0.16.1, then on 0.19.2, with ``VESPO_MCORE_NUMBERS`` naming one folder. Each run
records its numbers there (``<case>.mcore-<version>.pt``) and compares them with the record of every other release
found there. Within a run every layout equals its 1-rank reference (the layout tests), so equal references across
releases make every layout's numbers equal across releases.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import test_replay
from tests.distributed.parallel_cases import initial_weights, make_samples, run_layout
from tests.distributed.test_parallel_exactness import DTYPE, FAMILY
from vespo_megatron.megatron import compat
from vespo_megatron.megatron.batch import micro_batch
from vespo_megatron.megatron.loss import token_logprobs
from vespo_megatron.megatron.model import build_model
from vespo_megatron.megatron.parallel import init_parallel, spawn
from vespo_megatron.megatron.weights import load_global
from vespo_megatron.packing.reference import pack as pack_batch
from vespo_megatron.routing.replay import RoutingReplay
from vespo_megatron.routing.shard import batch_shard
from vespo_megatron.routing.trace import pack

pytestmark = pytest.mark.slow
NUMBERS = os.environ.get("VESPO_MCORE_NUMBERS")
# case -> tolerance. Sigmoid gates: up to 0.17 megatron-core normalises the gathered scores in the logits' dtype
# (fp64 here), from 0.18 in fp32 ("all intermediate calculations in fp32", cast at the end): the experts stay
# identical, the gate weights move by ~1e-8, the log-probs and router gradients by ~3e-7. Softmax gates are
# computed in fp32 by every release, so those numbers agree to the last bits.
CASES = {"exactness": 1e-12, "replay-qwen3_moe": 1e-12, "replay-deepseek_v3": 1e-6}


def exactness_numbers(rank: int) -> dict[str, torch.Tensor]:
    init_parallel()
    ref = run_layout(0, {}, FAMILY, DTYPE, initial_weights(FAMILY, DTYPE), make_samples(8), (1,))[0]
    out = {"loss": torch.tensor(ref["loss"], dtype=torch.float64)}
    out.update({f"logp/{sid}": lp for sid, lp in ref["logp"].items()})
    out.update({f"grad/{key}": g for key, g in ref["grads"].items()})
    return out


def replay_numbers(rank: int, family: str) -> dict[str, torch.Tensor]:
    init_parallel()
    hf = test_replay.hf_config(family)
    weights = test_replay.initial_weights(hf)
    samples = make_samples(test_replay.N_SAMPLES, seed=3)
    model = build_model(hf, dtype=test_replay.DTYPE)
    load_global(model, weights[0])
    experts = test_replay.capture(model, samples)  # sorted ids per (token, layer)
    load_global(model, weights[1])
    replay = RoutingReplay(model, "r3")
    batch = pack_batch(samples, cp=1, sp=1, sample_ids=list(range(len(samples))))
    mb = micro_batch(batch)
    with replay.phase("update", [batch_shard(pack(experts, replay.spec), batch, 0, 0, replay.layer_columns)]):
        output = model(mb.tokens[None], mb.position_ids[None], None, packed_seq_params=mb.packed_seq_params())
        logp, _ = token_logprobs(output, mb, hf.vocab_size, inplace=False)
        (logp * mb.loss_mask).sum().backward()
    out = {"experts": torch.from_numpy(np.concatenate(experts).astype(np.int64)), "logp": logp.detach()}
    out.update({f"grad/{n}": p.grad for n, p in model.named_parameters() if n.endswith("router.weight")})
    return out


def numbers(case: str) -> dict[str, torch.Tensor]:
    if case == "exactness":
        return spawn(exactness_numbers, 1)[0]
    return spawn(replay_numbers, 1, case.split("-", 1)[1])[0]


@pytest.mark.skipif(not NUMBERS, reason="VESPO_MCORE_NUMBERS is unset: scripts/test.sh sets it for its two runs "
                    "(megatron-core 0.16.1, then 0.19.2)")
@pytest.mark.parametrize("case", list(CASES))
def test_one_rank_references_equal_across_megatron_releases(case):
    version = compat.megatron_version()
    folder = Path(NUMBERS)
    folder.mkdir(parents=True, exist_ok=True)
    mine = numbers(case)
    assert all(torch.isfinite(v.double()).all() for v in mine.values())
    assert mine["logp"].abs().sum() > 0 if "logp" in mine else mine["loss"] != 0
    torch.save(mine, folder / f"{case}.mcore-{version}.pt")
    others = sorted(p for p in folder.glob(f"{case}.mcore-*.pt") if p.name != f"{case}.mcore-{version}.pt")
    for path in others:
        theirs = torch.load(path)
        assert sorted(theirs) == sorted(mine), path.name
        if "experts" in mine:  # the routing itself: identical on every release
            assert torch.equal(mine["experts"], theirs["experts"]), path.name
        for key, value in mine.items():
            diff = (value.double() - theirs[key].double()).abs().max().item() if value.numel() else 0.0
            assert value.shape == theirs[key].shape and diff <= CASES[case], f"{case} {key}: {diff:.3g} against " \
                f"{path.name}"
