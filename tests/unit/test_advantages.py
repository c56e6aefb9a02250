"""GRPO group advantages (r − mean)/(std + 1e-6) with the unbiased std, against hand values."""
import math

import pytest
import torch

from vespo_megatron.objectives import grpo_advantages


def test_groups_are_normalised_separately_with_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0], dtype=torch.float64)
    adv = grpo_advantages(rewards, ["a", "a", "a", "b", "b"])
    std_a = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    std_b = math.sqrt((1.0 + 1.0) / 1)
    expected = [(2 / 3) / (std_a + 1e-6), (-1 / 3) / (std_a + 1e-6), (-1 / 3) / (std_a + 1e-6),
                -1.0 / (std_b + 1e-6), 1.0 / (std_b + 1e-6)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-12)


def test_tensor_group_ids_in_any_order_and_no_std_option():
    rewards = torch.tensor([3.0, 1.0, 5.0, 1.0], dtype=torch.float64)
    groups = torch.tensor([7, 2, 7, 2])
    assert grpo_advantages(rewards, groups, norm_by_std=False).tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0])
    std = math.sqrt(2.0)
    assert grpo_advantages(rewards, groups).tolist() == pytest.approx(
        [-1 / (std + 1e-6), 0.0, 1 / (std + 1e-6), 0.0], rel=1e-12)


def test_equal_rewards_give_zero_and_singleton_groups_follow_verl():
    rewards = torch.tensor([0.5, 0.5, 0.5, 2.0], dtype=torch.float64)
    adv = grpo_advantages(rewards, [0, 0, 0, 1])
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[3].item() == pytest.approx(2.0 / (1.0 + 1e-6), rel=1e-12)  # mean 0, std 1


@pytest.mark.parametrize(
    "rewards, groups, field",
    [
        (torch.tensor([], dtype=torch.float64), [], "rewards"),
        (torch.tensor([1.0, float("nan")]), [0, 0], "row 1"),
        (torch.tensor([[1.0]]), [0], "rewards"),
        (torch.tensor([1.0, 2.0]), [0], "group_ids"),
    ],
)
def test_bad_inputs_name_the_field(rewards, groups, field):
    with pytest.raises(ValueError, match=field):
        grpo_advantages(rewards, groups)
