"""Context parallelism at the loss level, on 2 real gloo ranks.

Per-token log-probs are laid out in Megatron's zig-zag CP layout (the packer's index maps, cp = 2); each rank runs
the Megatron loss (``loss.objective``) on its own slots with the CP ``seq_sum``. The per-sequence logW, the loss and
the gradients w.r.t. the log-probs equal the 1-rank run (fp64, 1e-12), and the only collective during forward and
backward is ONE all-reduce of a [k, num_seqs] float64 tensor (bytes counted by wrapping torch.distributed).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.distributed.parallel_cases import make_samples
from vespo_megatron.megatron.batch import micro_batch
from vespo_megatron.megatron.loss import LossSettings, cp_seq_sum, objective
from vespo_megatron.megatron.parallel import spawn
from vespo_megatron.packing.reference import pack

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "broadcast", "all_to_all",
               "all_to_all_single", "all_gather_object", "send", "recv", "reduce")


def _table(samples) -> torch.Tensor:
    """A global per-(sequence, position) log-prob table [S, max_len] (fp64, values in [−6, −0.1])."""
    gen = torch.Generator().manual_seed(3)
    width = max(len(s.prompt) + len(s.response) for s in samples)
    return -(torch.rand(len(samples), width, generator=gen, dtype=torch.float64) * 5.9 + 0.1)


def _rank_losses(rank: int, cp: int) -> dict:
    return {name: _rank_loss(rank, cp, name) for name in ("vespo", "grpo")}


def _rank_loss(rank: int, cp: int, name: str) -> dict:
    samples = make_samples(6, seed=11)
    batch = pack(samples, cp=cp)
    table = _table(samples).requires_grad_(True)
    mb = micro_batch(batch, rank % cp)
    # the log-prob of slot p is that of its label token: sequence seq_ids[p], position position_ids[p] + 1
    pos = (mb.position_ids + 1).clamp(max=table.shape[1] - 1)
    logp = table[mb.seq_ids, pos] * mb.loss_mask + (1 - mb.loss_mask) * -1.0
    mb.old_log_prob = (logp.detach() + 0.3 * torch.sin(7.0 * logp.detach())).clamp(max=-1e-3)
    mb.global_tokens, mb.global_seqs = float(sum(len(s.response) for s in samples)), float(len(samples))
    group = dist.group.WORLD if cp > 1 else None
    sent: list[tuple[str, int]] = []
    originals = {n: getattr(dist, n) for n in COLLECTIVES}

    def counting(n):
        def call(tensor, *args, **kwargs):
            sent.append((n, tensor.numel() * tensor.element_size() if torch.is_tensor(tensor) else -1))
            return originals[n](tensor, *args, **kwargs)
        return call

    for n in COLLECTIVES:
        setattr(dist, n, counting(n))
    try:
        loss, _, metrics = objective(logp, torch.zeros_like(logp), mb, LossSettings(name=name), 1, cp_seq_sum(group))
        loss.backward()
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
    return {"loss": loss.item(), "grad": table.grad, "sent": sent, "num_seqs": mb.num_seqs,
            "log_w_mean": metrics["vespo/log_w_seq_mean"] if name == "vespo" else None,
            "log_w_max": metrics["vespo/log_w_seq_max"] if name == "vespo" else None}


@pytest.fixture(scope="module")
def runs():
    one, two = spawn(_rank_losses, 1, 1)[0], spawn(_rank_losses, 2, 2)
    return {name: (one[name], [r[name] for r in two]) for name in ("vespo", "grpo")}


@pytest.mark.parametrize("name", ["vespo", "grpo"])
def test_cp2_matches_one_rank(runs, name):
    one, two = runs[name]
    assert abs(sum(r["loss"] for r in two) - one["loss"]) < 1e-12
    assert one["grad"].abs().sum() > 0
    assert torch.allclose(two[0]["grad"] + two[1]["grad"], one["grad"], atol=1e-12, rtol=0)
    if name == "vespo":
        for key in ("log_w_mean", "log_w_max"):
            assert two[0][key] == pytest.approx(one[key], abs=1e-12)
            assert two[1][key] == pytest.approx(one[key], abs=1e-12)


@pytest.mark.parametrize("name", ["vespo", "grpo"])
def test_only_one_seq_all_reduce(runs, name):
    one, two = runs[name]
    assert one["sent"] == []
    for rank in two:
        assert len(rank["sent"]) == 1, rank["sent"]
        kind, nbytes = rank["sent"][0]
        assert kind == "all_reduce"
        assert nbytes % (8 * rank["num_seqs"]) == 0 and nbytes <= 8 * 8 * rank["num_seqs"]
