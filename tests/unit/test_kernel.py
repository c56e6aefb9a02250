"""VESPO kernel φ(W) = W^c1·exp(c2(1 − W)) against hand values and its closed form (fp64)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vespo_megatron.objectives.kernel import log_phi, phi, sequence_log_w, sign_parameters


def closed_form(w: float, c1: float, c2: float) -> float:
    return w**c1 * math.exp(c2 * (1.0 - w))


def kernel_at(w: float, c1: float, c2: float) -> float:
    return float(phi(torch.tensor([math.log(w)], dtype=torch.float64), c1, c2)[1])


@pytest.mark.parametrize(
    "c1, c2, w, rounded, half_unit",
    [
        (2.0, 3.0, 0.5, 1.120, 5e-4),
        (2.0, 3.0, 2.0, 0.199, 5e-4),
        (2.0, 3.0, 5.0, 1.5e-4, 5e-6),
        (3.0, 2.0, 0.5, 0.340, 5e-4),
        (3.0, 2.0, 1.5, 1.242, 5e-4),
        (3.0, 2.0, 3.0, 0.495, 5e-4),
    ],
)
def test_reference_values(c1, c2, w, rounded, half_unit):
    value = kernel_at(w, c1, c2)
    assert value == pytest.approx(rounded, abs=half_unit)
    assert value == pytest.approx(closed_form(w, c1, c2), rel=1e-12)


@pytest.mark.parametrize("c1, c2, peak", [(2.0, 3.0, 1.208), (3.0, 2.0, 1.242)])
def test_maximum_at_c1_over_c2(c1, c2, peak):
    expected = (c1 / c2) ** c1 * math.exp(c2 - c1)
    assert expected == pytest.approx(peak, abs=5e-4)
    assert kernel_at(c1 / c2, c1, c2) == pytest.approx(expected, rel=1e-12)
    grid = torch.linspace(-6.0, 3.0, 20001, dtype=torch.float64)
    values = phi(grid, c1, c2)[1]
    best = int(values.argmax())
    assert math.exp(float(grid[best])) == pytest.approx(c1 / c2, rel=1e-3)
    assert float(values.max()) <= expected * (1 + 1e-12)


def test_advantage_sign_selects_parameters_zero_counts_as_positive():
    adv = torch.tensor([1.0, 0.0, -1e-12, -3.0], dtype=torch.float64)
    c1, c2 = sign_parameters(adv, 2.0, 3.0, 3.0, 2.0)
    assert c1.tolist() == [2.0, 2.0, 3.0, 3.0]
    assert c2.tolist() == [3.0, 3.0, 2.0, 2.0]
    c1, _ = sign_parameters(adv, 1.05, 3.0, 2.5, 2.0)
    assert c1.dtype == torch.float64 and c1[0].item() == 1.05  # no float32 round trip


def test_power_term_floor_below_minus_18_42():
    # logW = -19: the power term sees log(1e-8), the linear term the true W.
    log_w = torch.tensor([-19.0], dtype=torch.float64)
    expected = math.exp(3.0 + 2.0 * math.log(1e-8) - 3.0 * math.exp(-19.0))
    assert float(phi(log_w, 2.0, 3.0)[1]) == pytest.approx(expected, rel=1e-12)
    above = torch.tensor([-18.0], dtype=torch.float64)
    assert float(phi(above, 2.0, 3.0)[1]) == pytest.approx(closed_form(math.exp(-18.0), 2.0, 3.0), rel=1e-12)


def test_c2_is_floored_at_1e_minus_4():
    w = torch.tensor([2.0], dtype=torch.float64)
    expected = 1e-4 + 2.0 * math.log(2.0) - 1e-4 * 2.0
    assert float(log_phi(w, 2.0, 0.0)) == pytest.approx(expected, rel=1e-12)


def test_non_finite_log_w_gives_zero_weight():
    log_w = torch.tensor([float("nan"), float("inf"), 20.0, -20.0, -float("inf")], dtype=torch.float64)
    _, weight = phi(log_w, 2.0, 3.0)
    assert weight[:3].tolist() == [0.0, 0.0, 0.0]  # NaN, +inf -> 0; exp(-3 * 4.85e8) underflows to exactly 0
    floor = math.exp(3.0 + 2.0 * math.log(1e-8))  # W -> 0: only the floored power term remains
    assert float(weight[3]) == pytest.approx(floor * math.exp(-3.0 * math.exp(-20.0)), rel=1e-12)
    assert float(weight[4]) == pytest.approx(floor, rel=1e-12)


def test_weights_are_detached():
    log_w = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    w, weight = phi(log_w, 2.0, 3.0)
    assert not w.requires_grad and not weight.requires_grad


@pytest.mark.parametrize(
    "transform, s, t, expected",
    [
        ("product", 7.0, 4.0, 7.0),
        ("product", 30.0, 4.0, 20.0),
        ("product", -1e4, 4.0, -20.0),
        ("lin", 30.0, 4.0, 7.5),
        ("sqrt", 30.0, 4.0, 15.0),
        ("lin", -1e4, 100.0, -20.0),
        ("sqrt", 3.0, 0.0, 3.0),  # T floored at 1
    ],
)
def test_log_w_transforms(transform, s, t, expected):
    out = sequence_log_w(torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), transform)
    assert float(out) == pytest.approx(expected, rel=1e-15)


@settings(max_examples=60, deadline=None)
@given(c1=st.floats(0.1, 8.0), c2=st.floats(0.1, 8.0), log_w=st.floats(-20.0, 20.0))
def test_phi_is_one_at_w_one_and_bounded_by_peak(c1, c2, log_w):
    assert kernel_at(1.0, c1, c2) == pytest.approx(1.0, rel=1e-12)
    peak = (c1 / c2) ** c1 * math.exp(c2 - c1)
    value = float(phi(torch.tensor([log_w], dtype=torch.float64), c1, c2)[1])
    assert 0.0 <= value <= peak * (1 + 1e-9)
