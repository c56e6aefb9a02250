"""Packed losses split over two simulated context-parallel ranks equal the unsharded run (fp64, 1e-12).

Each "rank" runs in its own thread on a subset of every sequence's tokens; its ``seq_sum`` is an all-reduce built
on a barrier (both ranks deposit their [k, num_seqs] partial sums and both get the total), so the collective is
exercised exactly as under torch.distributed, forward and backward. Also counts the ``seq_sum`` calls per loss:
1 in the forward pass, plus 1 in the backward pass for gspo with gspo_form="sequence".
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from vespo_megatron.objectives import AGG_MODES, POLICY_LOSSES, PackedPolicyInput, packed_policy_loss

RESPONSE_LENGTHS = [7, 3, 10, 1, 6, 4]
PROMPT_LENGTHS = [2, 3, 1, 2, 2, 3]
SEQ_ADVANTAGES = [1.0, -0.6, 0.3, -1.4, 0.0, -0.2]
GLOBAL_METRIC_PREFIXES = ("vespo/", "actor/approx_kl", "actor/entropy", "objective/")


class TwoRankAllReduce:
    """``seq_sum`` of two threads: each call returns the sum of both ranks' tensors; counts calls per rank."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=300)
        self.slots: list[torch.Tensor | None] = [None, None]
        self.calls = [0, 0]

    def for_rank(self, rank: int):
        def seq_sum(local: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = local.detach().clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()
            return total

        return seq_sum


class CountingIdentity:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return local


def packed_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    seq_ids = torch.cat([torch.full((p + r,), i) for i, (p, r) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS))])
    mask = torch.cat([torch.cat([torch.zeros(p), torch.ones(r)]) for p, r in zip(PROMPT_LENGTHS, RESPONSE_LENGTHS)])
    n = seq_ids.numel()
    lp = -0.05 - 1.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    old = (lp + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    # Sequences 1 and 4 drift far from the rollout policy, so MIS drops them.
    drift = torch.tensor([0.0, 0.4, 0.0, 0.0, -0.5, 0.0], dtype=torch.float64)[seq_ids]
    roll = (old - drift - 0.05 * torch.rand(n, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    entropy = torch.rand(n, generator=gen, dtype=torch.float64)
    seq_adv = torch.tensor(SEQ_ADVANTAGES, dtype=torch.float64)
    ranks = torch.randint(0, 2, (n,), generator=gen)
    return dict(log_prob=lp, old_log_prob=old, rollout_log_prob=roll, entropy=entropy, response_mask=mask,
                seq_ids=seq_ids, advantages=seq_adv[seq_ids] * mask, seq_advantages=seq_adv), ranks


def run_loss(tensors, index, seq_sum, name, mode, hp):
    lp = tensors["log_prob"][index].clone().requires_grad_()
    fields = {k: v[index] for k, v in tensors.items() if k not in ("log_prob", "seq_advantages")}
    inp = PackedPolicyInput(log_prob=lp, seq_advantages=tensors["seq_advantages"], num_seqs=len(RESPONSE_LENGTHS),
                            seq_sum=seq_sum, **fields)
    loss, metrics = packed_policy_loss(name, inp, mode, loss_scale_factor=16.0, honour_agg_mode=True, **hp)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


LOSS_CASES = [(name, {}) for name in POLICY_LOSSES] + [("gspo", {"gspo_form": "sequence", "eps_low": 0.2,
                                                                   "eps_high": 0.2})]


@pytest.mark.parametrize("options", [{}, {"tis": True, "mis": True}], ids=["plain", "tis+mis"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name, hp", LOSS_CASES)
def test_two_cp_shards_match_the_unsharded_run(name, hp, mode, options):
    hp = {**hp, **options}
    tensors, ranks = packed_batch()
    everything = torch.arange(ranks.numel())
    counter = CountingIdentity()
    loss, grad, metrics = run_loss(tensors, everything, counter, name, mode, hp)

    reduce = TwoRankAllReduce()
    shards = [(ranks == r).nonzero().squeeze(1) for r in (0, 1)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(run_loss, tensors, shards[r], reduce.for_rank(r), name, mode, hp) for r in (0, 1)]
        results = [f.result(timeout=300) for f in futures]

    sharded_loss = results[0][0] + results[1][0]
    assert torch.allclose(sharded_loss, loss, rtol=1e-12, atol=1e-14)
    sharded_grad = torch.zeros_like(grad)
    for r in (0, 1):
        sharded_grad[shards[r]] = results[r][1]
    assert torch.allclose(sharded_grad, grad, rtol=1e-12, atol=1e-14)
    for key, value in metrics.items():
        if key.startswith(GLOBAL_METRIC_PREFIXES):
            for r in (0, 1):
                assert results[r][2][key] == pytest.approx(value, rel=1e-12, abs=1e-14), key
    if options:
        assert metrics["objective/n_mis_dropped_seq"] == 2.0

    expected_calls = 2 if hp.get("gspo_form") == "sequence" else 1
    assert counter.calls == expected_calls
    assert reduce.calls == [expected_calls, expected_calls]
