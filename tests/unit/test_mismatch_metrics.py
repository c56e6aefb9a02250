"""Mismatch metrics against values computed by hand from the formulas in docs/mismatch.md and docs/vespo.md."""
import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vespo_megatron.metrics.mismatch import (
    ROUTING_LAYER_KEY,
    default_phi,
    mismatch_metrics,
    mismatch_samples,
    routing_disagreement,
)

# Two sequences with ids 7 (tokens 0-2) and 3 (tokens 3-4): in sorted-id order sequence 0 is id 3, sequence 1 is id 7.
LOGP_ROLLOUT = [-0.5, -1.0, -2.0, -0.1, -3.0]
DELTA = [0.2, 0.0, 1.5, 0.0, -2.5]
LOGP_TRAIN = [q + d for q, d in zip(LOGP_ROLLOUT, DELTA)]
SEQ_IDS = [7, 7, 7, 3, 3]
SEQ_ADV = [-1.0, 0.5]  # id 3: A < 0, id 7: A ≥ 0
SEQS = {3: [3, 4], 7: [0, 1, 2]}  # sorted-id order

# 5 tokens, 2 MoE layers, top-2. Token 1 layer 0 is the same set in another order; differing (token, layer) pairs:
# (2, 0), (3, 0), (4, 0), (4, 1).
EXPERTS_ROLLOUT = [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 2], [1, 3]], [[1, 2], [3, 0]], [[5, 6], [7, 4]]]
EXPERTS_TRAIN = [[[0, 1], [2, 3]], [[5, 4], [6, 7]], [[0, 3], [1, 3]], [[1, 7], [0, 3]], [[5, 0], [7, 1]]]


def _metrics(**kw):
    return mismatch_metrics(np.array(LOGP_TRAIN), np.array(LOGP_ROLLOUT), np.array(SEQ_IDS), **kw)


def _mean(xs):
    return sum(xs) / len(xs)


def test_token_metrics_match_hand_values():
    m = _metrics()
    assert m["count/tokens"] == 5 and m["count/seqs"] == 2
    assert m["kl/k1"] == pytest.approx(_mean([-d for d in DELTA]), abs=1e-15)
    assert m["kl/k2"] == pytest.approx(_mean([0.5 * d * d for d in DELTA]), rel=1e-14)
    assert m["kl/k3"] == pytest.approx(_mean([math.exp(d) - 1 - d for d in DELTA]), rel=1e-14)
    assert m["logp/abs_diff_mean"] == pytest.approx(4.2 / 5, rel=1e-14)
    assert m["logp/abs_diff_max"] == pytest.approx(2.5, rel=1e-14)
    assert m["logp/sq_diff_mean"] == pytest.approx((0.04 + 2.25 + 6.25) / 5, rel=1e-14)
    assert m["logp/extreme_frac_tau2"] == pytest.approx(2 / 5)  # |Δ| > ln 2: 1.5, 2.5
    assert m["logp/extreme_frac_tau5"] == pytest.approx(1 / 5)  # |Δ| > ln 5: 2.5
    assert m["logp/token_mult_prob_error"] == pytest.approx(_mean([math.exp(abs(d)) for d in DELTA]), rel=1e-14)
    assert m["chi2/token"] == pytest.approx(_mean([math.exp(2 * d) for d in DELTA]) - 1, rel=1e-14)


def test_probability_metrics_match_hand_values():
    m = _metrics()
    p = [math.exp(x) for x in LOGP_TRAIN]
    q = [math.exp(x) for x in LOGP_ROLLOUT]
    abs_diff = [abs(a - b) for a, b in zip(p, q)]
    assert m["prob/abs_diff_mean"] == pytest.approx(_mean(abs_diff), rel=1e-14)
    assert m["prob/abs_diff_max"] == pytest.approx(max(abs_diff), rel=1e-14)
    assert m["prob/abs_diff_std"] == pytest.approx(statistics.pstdev(abs_diff), rel=1e-12)
    assert m["prob/pearson"] == pytest.approx(statistics.correlation(p, q), rel=1e-12)


def test_sequence_metrics_match_hand_values():
    m = _metrics()
    # −mean_t logp per sequence, ids 3 then 7.
    ppl_train = [-(-0.1 - 5.5) / 2, -(-0.3 - 1.0 - 0.5) / 3]
    ppl_rollout = [-(-0.1 - 3.0) / 2, -(-0.5 - 1.0 - 2.0) / 3]
    assert m["ppl/log_ppl_train"] == pytest.approx(_mean(ppl_train), rel=1e-14)
    assert m["ppl/log_ppl_rollout"] == pytest.approx(_mean(ppl_rollout), rel=1e-14)
    assert m["ppl/log_ppl_diff"] == pytest.approx(_mean(ppl_train) - _mean(ppl_rollout), rel=1e-13)
    ratios = [math.exp(a - b) for a, b in zip(ppl_train, ppl_rollout)]
    assert m["ppl/ratio"] == pytest.approx(_mean(ratios), rel=1e-13)
    log_w = [-2.5, 1.7]  # Σ_t Δ_t of ids 3 and 7
    w = [math.exp(x) for x in log_w]
    assert m["chi2/seq"] == pytest.approx(_mean([x * x for x in w]) - 1, rel=1e-13)
    assert m["seq/ess"] == pytest.approx(sum(w) ** 2 / (2 * sum(x * x for x in w)), rel=1e-13)
    assert m["vespo/log_w_mean"] == pytest.approx(-0.4, rel=1e-13)
    assert m["vespo/log_w_min"] == pytest.approx(-2.5, rel=1e-14)
    assert m["vespo/log_w_max"] == pytest.approx(1.7, rel=1e-14)
    for pct in (5, 25, 50, 75, 95):  # linear interpolation between the two sorted values
        assert m[f"vespo/log_w_p{pct:02d}"] == pytest.approx(-2.5 + pct / 100 * 4.2, rel=1e-13)


def _phi_by_hand(log_w, c1, c2):
    w = math.exp(log_w)
    return w**c1 * math.exp(c2 * (1 - w))


def test_phi_fractions_match_hand_values():
    # φ+(2,3): id 3 (logW −2.5) ≈ 0.106, id 7 (logW 1.7) ≈ 4.5e-5. φ−(3,2): id 3 ≈ 0.0035, id 7 ≈ 0.0215.
    assert _phi_by_hand(-2.5, 2, 3) > 0.01 > _phi_by_hand(1.7, 2, 3)
    assert _phi_by_hand(1.7, 3, 2) > 0.01 > _phi_by_hand(-2.5, 3, 2)
    m = _metrics(seq_adv=np.array(SEQ_ADV))
    assert m["vespo/phi_small_frac_pos"] == 0.5
    assert m["vespo/phi_small_frac_neg"] == 0.5
    assert m["vespo/phi_small_frac"] == 1.0  # id 3 with A < 0 and id 7 with A ≥ 0 are both below 0.01
    assert "vespo/phi_small_frac" not in _metrics()


def test_default_phi_matches_kernel_values():
    log_w = np.log([0.5, 2.0, 5.0, 0.5, 1.5, 3.0, 1.0])
    adv = np.array([1.0, 0.0, 2.0, -1.0, -1.0, -1.0, -1.0])  # A = 0 takes the A ≥ 0 kernel
    expected = [_phi_by_hand(x, 2, 3) for x in log_w[:3]] + [_phi_by_hand(x, 3, 2) for x in log_w[3:]]
    np.testing.assert_allclose(default_phi(log_w, adv), expected, rtol=1e-13)
    np.testing.assert_allclose(default_phi(log_w, adv)[[0, 1, 3, 4, 6]], [1.120, 0.199, 0.340, 1.242, 1.0], atol=1e-3)


def test_default_phi_power_term_floors_w_at_1e_8():
    log_w = np.array([-19.0])  # W ≈ 5.6e-9 < 1e-8: W^c1 is taken as 1e-8^c1, the linear term keeps W
    expected = 1e-8**2 * math.exp(3 * (1 - math.exp(-19.0)))
    np.testing.assert_allclose(default_phi(log_w, np.ones(1)), [expected], rtol=1e-13)


def test_phi_fn_receives_log_w_and_advantages_in_sorted_id_order():
    calls = []

    def phi_fn(log_w, seq_adv):
        calls.append((log_w.tolist(), seq_adv.tolist()))
        return np.zeros_like(log_w)

    m = _metrics(seq_adv=np.array(SEQ_ADV), phi_fn=phi_fn)
    assert m["vespo/phi_small_frac"] == 1.0
    np.testing.assert_allclose(calls[-1][0], [-2.5, 1.7], rtol=1e-14)
    assert calls[-1][1] == SEQ_ADV
    assert [c[1] for c in calls[:2]] == [[1.0, 1.0], [-1.0, -1.0]]


def test_phi_threshold_is_strictly_below_one_percent():
    m = _metrics(seq_adv=np.array(SEQ_ADV), phi_fn=lambda log_w, adv: np.array([0.01, 0.0099999]))
    assert m["vespo/phi_small_frac"] == 0.5


def test_log_w_clamps_each_token_then_the_sum_while_chi2_clamps_the_raw_sum():
    delta = np.array([25.0, -10.0])  # VESPO: clamp(20 − 10) = 10; χ²: clamp(15) = 15
    m = mismatch_metrics(delta - 1.0, np.full(2, -1.0), np.zeros(2, dtype=np.int64))
    assert m["vespo/log_w_max"] == pytest.approx(10.0, rel=1e-14)
    assert m["chi2/seq"] == pytest.approx(math.exp(30.0) - 1, rel=1e-12)
    assert m["chi2/token"] == pytest.approx((math.exp(40.0) + math.exp(-20.0)) / 2 - 1, rel=1e-12)
    samples = mismatch_samples(delta - 1.0, np.full(2, -1.0), np.zeros(2, dtype=np.int64))
    np.testing.assert_allclose(samples.delta, delta, rtol=1e-14)
    np.testing.assert_allclose(samples.log_w, [10.0], rtol=1e-14)


def test_routing_matches_hand_values_and_ignores_order_within_a_row():
    m = _metrics(experts_train=np.array(EXPERTS_TRAIN), experts_rollout=np.array(EXPERTS_ROLLOUT))
    differs = [[set(t) != set(r) for t, r in zip(tr, ro)] for tr, ro in zip(EXPERTS_TRAIN, EXPERTS_ROLLOUT)]
    assert differs == [[False, False], [False, False], [True, False], [True, False], [True, True]]
    assert m[ROUTING_LAYER_KEY] == pytest.approx([3 / 5, 1 / 5])
    assert m["routing/any_layer_disagree_frac"] == pytest.approx(3 / 5)
    assert m["routing/mean_layers_disagree"] == pytest.approx((0 + 0 + 1 + 1 + 2) / 5)
    assert "routing/any_layer_disagree_frac" not in _metrics()


def test_identical_inputs_show_no_mismatch():
    experts = np.array(EXPERTS_ROLLOUT)
    permuted = experts[..., ::-1]  # same sets, other order
    m = mismatch_metrics(np.array(LOGP_ROLLOUT), np.array(LOGP_ROLLOUT), np.array(SEQ_IDS),
                         experts_train=permuted, experts_rollout=experts)
    for key in ("kl/k1", "kl/k2", "kl/k3", "logp/abs_diff_max", "logp/extreme_frac_tau2", "logp/extreme_frac_tau5",
                "prob/abs_diff_max", "ppl/log_ppl_diff", "chi2/token", "chi2/seq", "vespo/log_w_max",
                "routing/any_layer_disagree_frac", "routing/mean_layers_disagree"):
        assert m[key] == 0.0, key
    assert m[ROUTING_LAYER_KEY] == [0.0, 0.0]
    for key in ("ppl/ratio", "logp/token_mult_prob_error", "seq/ess"):
        assert m[key] == 1.0, key
    assert m["prob/pearson"] == pytest.approx(1.0, rel=1e-14)


def test_pearson_of_a_constant_side_is_nan():
    m = mismatch_metrics(np.array([-1.0, -2.0]), np.array([-1.0, -1.0]), np.array([0, 1]))
    assert math.isnan(m["prob/pearson"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-8, 0), st.floats(-8, 0), st.integers(0, 3)), min_size=1, max_size=30))
def test_bounds_hold_for_any_input(rows):
    train, rollout, ids = (np.array(col) for col in zip(*rows))
    m = mismatch_metrics(train, rollout, ids.astype(np.int64))
    assert m["kl/k3"] >= 0 and m["kl/k2"] >= 0 and m["logp/token_mult_prob_error"] >= 1
    assert m["chi2/token"] >= -1 and m["chi2/seq"] >= -1
    assert 1 / m["count/seqs"] - 1e-12 <= m["seq/ess"] <= 1 + 1e-12
    assert m["vespo/log_w_min"] <= m["vespo/log_w_p50"] <= m["vespo/log_w_max"]


GOOD = dict(logp_train=LOGP_TRAIN, logp_rollout=LOGP_ROLLOUT, seq_ids=SEQ_IDS)


@pytest.mark.parametrize("change, field", [
    (dict(logp_rollout=LOGP_ROLLOUT[:4]), "logp_rollout"),
    (dict(seq_ids=SEQ_IDS[:4]), "seq_ids"),
    (dict(seq_ids=[7.0, 7.0, 7.0, 3.0, 3.0]), "seq_ids"),
    (dict(logp_train=[], logp_rollout=[], seq_ids=np.zeros(0, dtype=np.int64)), "logp_train"),
    (dict(logp_train=np.array(LOGP_TRAIN)[None]), "logp_train"),
    (dict(logp_rollout=[-0.5, math.nan, -2.0, -0.1, -3.0]), r"logp_rollout\[1\]"),
    (dict(logp_train=[-0.5, -1.0, -math.inf, -0.1, -3.0]), r"logp_train\[2\]"),
    (dict(seq_adv=[1.0]), "seq_adv"),
    (dict(seq_adv=[1.0, math.nan]), r"seq_adv\[1\]"),
    (dict(phi_fn=lambda log_w, adv: np.zeros(3)), "phi_fn"),
    (dict(experts_train=EXPERTS_TRAIN), "experts_rollout"),
    (dict(experts_train=EXPERTS_TRAIN[:4], experts_rollout=EXPERTS_ROLLOUT[:4]), "experts_train"),
    (dict(experts_train=EXPERTS_TRAIN, experts_rollout=np.array(EXPERTS_ROLLOUT)[:, :1]), "experts_rollout"),
    (dict(experts_train=np.array(EXPERTS_TRAIN, dtype=float), experts_rollout=EXPERTS_ROLLOUT), "experts_train"),
    (dict(experts_train=EXPERTS_TRAIN, experts_rollout=np.array(EXPERTS_ROLLOUT)[:, 0]), "experts_rollout"),
])
def test_bad_input_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        mismatch_metrics(**{**GOOD, **change})


@pytest.mark.parametrize("row, layer, value", [(2, 1, [4, 4]), (4, 0, [-1, 3])])
def test_an_expert_row_that_is_not_a_set_names_field_row_and_layer(row, layer, value):
    bad = np.array(EXPERTS_ROLLOUT)
    bad[row, layer] = value
    with pytest.raises(ValueError, match=rf"experts_rollout: row {row}, layer {layer}"):
        routing_disagreement(np.array(EXPERTS_TRAIN), bad)
