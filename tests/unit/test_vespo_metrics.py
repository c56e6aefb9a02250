"""VESPO metrics (W, logW, φ by sign, noise negatives, ESS, TIS, approx-KL, entropy) against hand values."""
import math
import statistics

import pytest
import torch

from vespo_megatron.objectives.metrics import effective_sample_size, sequence_metrics, vespo_metrics

LOG_W = [0.5, -1.0, 5.0, 0.0, 2.0]
ADV = [1.0, -1.0, -2.0, 0.0, 0.5]
ACTIVE = [True, True, True, True, False]


def phi_of(log_w, a):
    c1, c2 = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
    w = math.exp(log_w)
    return w**c1 * math.exp(c2 * (1 - w))


def compute(seq_log_tis=None):
    log_w = torch.tensor(LOG_W, dtype=torch.float64)
    phi = torch.tensor([phi_of(x, a) for x, a in zip(LOG_W, ADV)], dtype=torch.float64)
    return vespo_metrics(log_w, log_w.exp(), phi, torch.tensor(ADV, dtype=torch.float64), torch.tensor(ACTIVE),
                         (2.0, 3.0, 3.0, 2.0), seq_log_tis)


def test_vespo_metrics_match_hand_values():
    m = compute()
    ws = [math.exp(x) for x, on in zip(LOG_W, ACTIVE) if on]
    phis = [phi_of(x, a) for x, a, on in zip(LOG_W, ADV, ACTIVE) if on]
    assert m["vespo/w_seq_mean"] == pytest.approx(statistics.mean(ws), rel=1e-12)
    assert m["vespo/w_seq_std"] == pytest.approx(statistics.stdev(ws), rel=1e-12)
    assert (m["vespo/w_seq_max"], m["vespo/w_seq_min"]) == pytest.approx((math.exp(5.0), math.exp(-1.0)))
    assert (m["vespo/log_w_seq_mean"], m["vespo/log_w_seq_max"]) == pytest.approx((4.5 / 4, 5.0))
    assert m["vespo/phi_max"] == pytest.approx(max(phis), rel=1e-12)
    # strict signs: A = 0 is in neither group; the inactive sequence is ignored
    assert (m["vespo/n_pos_seq"], m["vespo/n_neg_seq"]) == (1.0, 2.0)
    assert m["vespo/w_seq_neg_mean"] == pytest.approx((math.exp(-1.0) + math.exp(5.0)) / 2, rel=1e-12)
    assert m["vespo/phi_pos_mean"] == pytest.approx(phis[0], rel=1e-12)
    # A < 0 and W > 100: only e^5 = 148.4
    assert m["vespo/neg_noise_count"] == 1.0
    assert m["vespo/neg_noise_max_w"] == pytest.approx(math.exp(5.0), rel=1e-12)
    assert m["vespo/neg_noise_phi_mean"] == pytest.approx(phi_of(5.0, -2.0), rel=1e-12, abs=1e-300)
    mean_w = statistics.mean(ws)
    assert m["vespo/ess"] == pytest.approx(1 / statistics.mean([(w / mean_w) ** 2 for w in ws]), rel=1e-12)
    assert (m["vespo/k_pos"], m["vespo/lambda_pos"], m["vespo/k_neg"], m["vespo/lambda_neg"]) == (2, 3, 3, 2)
    assert m["vespo/tis_enabled"] == 0.0 and m["vespo/seq_tis_max"] == 0.0
    assert all(isinstance(v, float) for v in m.values())


def test_tis_statistics():
    m = compute(torch.tensor([0.1, -0.3, 25.0, 0.0, 9.0], dtype=torch.float64))
    assert m["vespo/tis_enabled"] == 1.0
    assert (m["vespo/seq_log_tis_max"], m["vespo/seq_log_tis_min"]) == (25.0, -0.3)
    assert m["vespo/seq_log_tis_mean"] == pytest.approx((0.1 - 0.3 + 25.0) / 4, rel=1e-12)
    assert m["vespo/seq_tis_max"] == pytest.approx(math.exp(20.0), rel=1e-12)  # clamped at 20


def test_empty_selection_and_single_sequence_give_zeros_not_nan():
    log_w = torch.tensor([0.3], dtype=torch.float64)
    one = vespo_metrics(log_w, log_w.exp(), log_w, torch.tensor([1.0]), torch.tensor([True]), (2, 3, 3, 2))
    assert one["vespo/w_seq_std"] == 0.0 and one["vespo/ess"] == pytest.approx(1.0)
    none = vespo_metrics(log_w, log_w.exp(), log_w, torch.tensor([1.0]), torch.tensor([False]), (2, 3, 3, 2))
    assert all(v == 0.0 for k, v in none.items() if not k.startswith(("vespo/k_", "vespo/lambda_")))


def test_effective_sample_size_bounds():
    assert effective_sample_size(torch.ones(8)).item() == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([1.0, 0.0, 0.0, 0.0])).item() == pytest.approx(0.25)
    assert effective_sample_size(torch.zeros(3)).item() == 0.0


def test_sequence_metrics_approx_kl_entropy_and_counts():
    seq_log_ratio = torch.tensor([-0.3, 0.2, 5.0, 0.0], dtype=torch.float64)
    counts = torch.tensor([3.0, 2.0, 4.0, 0.0], dtype=torch.float64)
    valid = torch.tensor([True, True, False, True])
    kept = torch.tensor([True, False, True, True])
    entropy = torch.tensor([1.5, 9.0, 9.0, 0.0], dtype=torch.float64)
    m = sequence_metrics(seq_log_ratio, counts, valid, kept, entropy)
    assert m["actor/approx_kl"] == pytest.approx(0.3 / 3, rel=1e-12)  # only sequence 0 is active
    assert m["actor/entropy"] == pytest.approx(1.5 / 3, rel=1e-12)
    assert (m["objective/n_active_seq"], m["objective/n_invalid_seq"], m["objective/n_mis_dropped_seq"]) == (1, 1, 1)
