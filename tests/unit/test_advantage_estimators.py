"""Advantage estimators, dynamic sampling and KL / entropy regularisers against hand values (fp64)."""
import math

import pytest
import torch

from vespo_megatron.objectives.advantages import (ADVANTAGE_ESTIMATORS, compute_advantages, varying_groups)
from vespo_megatron.objectives.regularizers import kl_penalty, regularizer_per_token

T = torch.float64
R = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 5.0], dtype=T)  # groups a: 1 0 0, b: 2 4, c: 5 (alone)
G = ["a", "a", "a", "b", "b", "c"]


def test_grpo_and_dr_grpo_hand_values():
    std_a = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    std_b = math.sqrt(2.0)
    assert compute_advantages("grpo", R, G).tolist() == pytest.approx(
        [(2 / 3) / (std_a + 1e-6), (-1 / 3) / (std_a + 1e-6), (-1 / 3) / (std_a + 1e-6),
         -1 / (std_b + 1e-6), 1 / (std_b + 1e-6), 5 / (1 + 1e-6)], rel=1e-12)
    assert compute_advantages("dr-grpo", R, G).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -1, 1, 5], rel=1e-12)


def test_rloo_hand_values():
    # a: 1 - (0+0)/2 = 1, 0 - (1+0)/2 = -0.5; b: 2 - 4 = -2, 4 - 2 = 2; c alone: 5
    assert compute_advantages("rloo", R, G).tolist() == pytest.approx([1, -0.5, -0.5, -2, 2, 5], rel=1e-12)


def test_reinforce_pp_baseline_hand_values():
    a = [2 / 3, -1 / 3, -1 / 3, -1.0, 1.0, 5.0]  # group-mean baseline (c alone keeps its reward)
    mean = sum(a) / 6
    var = sum((x - mean) ** 2 for x in a) / 5  # unbiased over 6 tokens
    expected = [(x - mean) / math.sqrt(var + 1e-8) for x in a]
    assert compute_advantages("reinforce++-baseline", R, G).tolist() == pytest.approx(expected, rel=1e-12)
    lengths = torch.tensor([1, 1, 1, 1, 1, 3], dtype=T)  # the last sample's 3 tokens weigh 3
    w = [1, 1, 1, 1, 1, 3]
    mean = sum(wi * x for wi, x in zip(w, a)) / 8
    var = sum(wi * (x - mean) ** 2 for wi, x in zip(w, a)) / 7
    expected = [(x - mean) / math.sqrt(var + 1e-8) for x in a]
    assert compute_advantages("reinforce++-baseline", R, G, lengths).tolist() == pytest.approx(expected, rel=1e-12)


def test_estimator_registry_and_errors():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr-grpo", "rloo", "reinforce++-baseline"}
    with pytest.raises(ValueError, match="--advantage-estimator: unknown estimator 'gae'"):
        compute_advantages("gae", R, G)
    with pytest.raises(ValueError, match="rewards: non-finite reward at row 1"):
        compute_advantages("rloo", torch.tensor([1.0, float("inf")]), [0, 0])
    with pytest.raises(ValueError, match="response_lengths"):
        compute_advantages("reinforce++-baseline", R, G, torch.zeros(6, dtype=T))


def test_dynamic_sampling_drops_constant_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.3], dtype=T)
    keep = varying_groups(rewards, [0, 0, 1, 1, 2, 2, 3])
    assert keep.tolist() == [False, False, True, True, False, False, True]  # a group of one is kept


def test_kl_types_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=T)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=T)
    d = [-0.5, 1.0, 0.0]  # ref - logp
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0])
    assert kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.5, 0.0])
    k3 = [math.exp(x) - x - 1 for x in d]
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx(k3, rel=1e-12)
    assert kl_penalty(logp, ref, "low_var_kl").tolist() == pytest.approx(k3, rel=1e-12)
    far = kl_penalty(torch.tensor([-30.0], dtype=T), torch.tensor([-1.0], dtype=T), "k3")
    assert far.item() == 10.0  # clamped
    with pytest.raises(ValueError, match="--kl-loss-type: unknown type 'k4'"):
        kl_penalty(logp, ref, "k4")


def test_k3_gradient_and_regulariser_sum():
    logp = torch.tensor([-1.0, -2.0], dtype=T, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0], dtype=T)
    kl_penalty(logp, ref, "k3").sum().backward()
    # d/dlogp [exp(ref-logp) - (ref-logp) - 1] = -exp(ref-logp) + 1
    assert logp.grad.tolist() == pytest.approx([1 - math.exp(-0.5), 1 - math.exp(1.0)], rel=1e-12)
    ent = torch.tensor([0.7, 0.2], dtype=T)
    term = regularizer_per_token(logp.detach(), ent, ref, kl_coef=0.1, kl_loss_type="k1", entropy_coef=0.01)
    assert term.tolist() == pytest.approx([0.1 * 0.5 - 0.007, 0.1 * -1.0 - 0.002], rel=1e-12)
    with pytest.raises(ValueError, match="--kl-coef: needs the reference log-probs"):
        regularizer_per_token(logp, kl_coef=0.1)
