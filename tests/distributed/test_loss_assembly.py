"""One loss assembly: the pure API (``compute_policy_loss`` on verl's padded tensors) and the Megatron loss path
(``megatron.loss.policy_loss`` on packed vocabulary logits) give the same loss and logits gradient for every
registered loss × aggregation mode (1 rank, fp64), gspo/sapo with and without ``honour_agg_mode``."""
import itertools

import pytest
import torch

from tests.distributed.parallel_cases import make_samples
from vespo_megatron.megatron.batch import micro_batch
from vespo_megatron.megatron.loss import LossSettings, policy_loss
from vespo_megatron.megatron.parallel import init_parallel, spawn
from vespo_megatron.objectives import AGG_MODES, POLICY_LOSSES, PolicyLossConfig, compute_policy_loss
from vespo_megatron.packing.reference import pack

pytestmark = pytest.mark.slow

VOCAB, SCALE = 64, 12.0
CASES = [(name, mode, honour) for name, mode, honour in itertools.product(POLICY_LOSSES, AGG_MODES, (False, True))
         if honour is False or name in ("gspo", "sapo")]


def _padded(mb, values: torch.Tensor, width: int) -> torch.Tensor:
    """Per-slot values [t] -> [num_seqs, width]: each sequence's response slots (loss mask 1) left-aligned."""
    out = values.new_zeros(mb.num_seqs, width)
    for i in range(mb.num_seqs):
        sel = ((mb.seq_ids == i) & (mb.loss_mask > 0)).nonzero()[:, 0]
        out[i, :len(sel)] = values[sel]
    return out


def compare_rank(rank: int) -> dict:
    init_parallel()
    samples = make_samples(6, seed=5, vocab=VOCAB)
    mb = micro_batch(pack(samples, cp=1, sp=1))
    gen = torch.Generator().manual_seed(3)
    t = mb.tokens.numel()
    mb.old_log_prob = -torch.rand(t, generator=gen, dtype=torch.float64) * 4 - 0.5
    mb.global_tokens, mb.global_seqs = float(mb.loss_mask.sum()), float(mb.num_seqs)
    logits = torch.randn(1, t, VOCAB, generator=gen, dtype=torch.float64)
    width = max(len(s.response) for s in samples)
    mask = _padded(mb, mb.loss_mask, width)
    out = {}
    for name, mode, honour in CASES:
        cfg = PolicyLossConfig.from_hparams()
        settings = LossSettings(name=name, agg_mode=mode, loss_scale_factor=SCALE, honour_agg_mode=honour, hparams=cfg)
        meg_logits = logits.clone().requires_grad_(True)
        loss_meg, _, _ = policy_loss(meg_logits.clone(), mb, settings, VOCAB, num_microbatches=1)
        loss_meg.backward()
        pure_logits = logits.clone().requires_grad_(True)
        logp = torch.log_softmax(pure_logits[0], dim=-1).gather(1, mb.labels[:, None])[:, 0]
        loss_pure, _ = compute_policy_loss(
            name, _padded(mb, logp, width), _padded(mb, mb.old_log_prob, width),
            _padded(mb, mb.advantages, width), mask, mode,
            rollout_log_prob=_padded(mb, mb.rollout_log_prob, width) + (1 - mask) * -1.0,
            loss_scale_factor=SCALE, honour_agg_mode=honour)
        loss_pure.backward()
        out[(name, mode, honour)] = (float(loss_meg), float(loss_pure),
                                     float((meg_logits.grad - pure_logits.grad).abs().max()),
                                     float(pure_logits.grad.abs().max()))
    return out


@pytest.fixture(scope="module")
def results():
    return spawn(compare_rank, 1)[0]


@pytest.mark.parametrize("name, mode, honour", CASES)
def test_pure_api_equals_megatron_path(results, name, mode, honour):
    loss_meg, loss_pure, grad_diff, grad_scale = results[(name, mode, honour)]
    assert loss_pure != 0.0 and grad_scale > 0.0
    assert abs(loss_meg - loss_pure) <= 1e-12 * max(1.0, abs(loss_pure)), (loss_meg, loss_pure)
    assert grad_diff <= 1e-12 * max(1.0, grad_scale), grad_diff
