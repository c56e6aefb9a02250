"""Extreme and non-finite log-probabilities: finite losses and gradients, weight 0 where the official code gives 0."""
import math

import pytest
import torch

from vespo_megatron.objectives import POLICY_LOSSES, PackedPolicyInput, compute_policy_loss, packed_policy_loss

SEQUENCE_LEVEL = {"vespo", "vespo-lin", "vespo-sqrt", "gspo"}
NAN, INF = float("nan"), float("inf")


def clean_batch():
    gen = torch.Generator().manual_seed(7)
    lp = -0.2 - torch.rand(4, 5, generator=gen, dtype=torch.float64)
    old = (lp + 0.1 * torch.randn(4, 5, generator=gen, dtype=torch.float64)).clamp(max=-0.01)
    roll = (old + 0.05 * torch.randn(4, 5, generator=gen, dtype=torch.float64)).clamp(max=-0.01)
    mask = torch.ones(4, 5, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    adv = torch.tensor([[1.0], [-0.7], [0.4], [-1.2]], dtype=torch.float64) * mask
    return lp, old, roll, adv, mask


def loss_and_grad(name, lp, old, roll, adv, mask, **hp):
    lp = lp.clone().requires_grad_()
    loss, metrics = compute_policy_loss(name, lp, old, adv, mask, rollout_log_prob=roll, **hp)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("tis", [False, True])
@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_non_finite_log_probs_give_weight_zero(name, tis):
    lp, old, roll, adv, mask = clean_batch()
    bad_lp, bad_old, bad_roll = lp.clone(), old.clone(), roll.clone()
    bad = [(1, 0), (2, 3), (3, 1)]  # response tokens hit by NaN / inf / -inf
    bad_lp[1, 0], bad_old[2, 3], bad_lp[3, 1] = NAN, INF, -INF
    bad_lp[1, 4] = NAN  # padding: ignored
    if tis:
        bad_roll[0, 2] = NAN
        bad.append((0, 2))
    loss, grad, metrics = loss_and_grad(name, bad_lp, bad_old, bad_roll, adv, mask, tis=tis)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    # Expected: the same batch with finite values where the affected sequence (sequence-level losses) or token
    # (token-level losses) has advantage 0, which makes its contribution 0 while keeping the normalisers.
    neutral = adv.clone()
    for row, col in bad:
        if name in SEQUENCE_LEVEL:
            neutral[row] = 0.0
        else:
            neutral[row, col] = 0.0
    expected, expected_grad, _ = loss_and_grad(name, lp, old, roll, neutral, mask, tis=tis)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=1e-15)
    assert torch.allclose(grad, expected_grad, rtol=1e-12, atol=1e-15)
    for row, col in bad:
        assert grad[row, col] == 0.0
    if name in SEQUENCE_LEVEL:
        assert metrics["objective/n_invalid_seq"] == len({row for row, _ in bad})


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_log_w_of_plus_minus_1e4_stays_finite(name):
    # 500 tokens at the per-token clamp |lr| = 20: Σ lr = ±1e4 before the sequence clamp.
    n = 500
    lp = torch.tensor([[-0.01] * n, [-25.0] * n], dtype=torch.float64)
    old = torch.tensor([[-20.01] * n, [-5.0] * n], dtype=torch.float64)
    mask = torch.ones_like(lp)
    for signs in ((1.0, -1.0), (-1.0, 1.0)):
        adv = torch.tensor([[signs[0]], [signs[1]]], dtype=torch.float64) * mask
        loss, grad, metrics = loss_and_grad(name, lp, old, old, adv, mask)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(math.isfinite(v) for v in metrics.values())
        if name == "vespo":
            assert metrics["vespo/log_w_seq_max"] == 20.0 and metrics["vespo/log_w_seq_min"] == -20.0
            c1, c2 = (2.0, 3.0) if signs[1] >= 0 else (3.0, 2.0)
            phi_low = math.exp(c2 + c1 * math.log(1e-8) - c2 * math.exp(-20.0))  # W = e^-20; φ(e^20) = 0
            assert loss.item() == pytest.approx(-phi_low * signs[1] * (-25.0) * n / (2 * n), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["vespo", "grpo", "gspo"])
def test_low_precision_inputs_are_computed_in_at_least_float32(name, dtype):
    lp, old, roll, adv, mask = clean_batch()
    rounded = [x.to(dtype).double() for x in (lp, old, adv)]
    reference, _, _ = loss_and_grad(name, rounded[0], rounded[1], roll, rounded[2], mask)
    low = lp.to(dtype).requires_grad_()
    loss, _ = compute_policy_loss(name, low, old.to(dtype), adv.to(dtype), mask.to(dtype))
    (grad,) = torch.autograd.grad(loss, low)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)


def test_bool_mask_and_non_finite_entropy_are_accepted():
    lp, old, _, adv, mask = clean_batch()
    entropy = torch.rand(4, 5, dtype=torch.float64)
    entropy[0, 0] = NAN
    seq_ids = torch.arange(4).repeat_interleave(5)
    losses = []
    for response_mask in (mask.reshape(-1), mask.reshape(-1).bool()):
        inp = PackedPolicyInput(log_prob=lp.reshape(-1), old_log_prob=old.reshape(-1), advantages=adv.reshape(-1),
                                response_mask=response_mask, seq_ids=seq_ids, seq_advantages=adv[:, 0], num_seqs=4,
                                entropy=entropy.reshape(-1))
        loss, metrics = packed_policy_loss("vespo", inp)
        losses.append(loss.item())
        assert math.isfinite(metrics["actor/entropy"])
    assert losses[0] == losses[1]
