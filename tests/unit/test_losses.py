"""Every policy loss against values and gradients computed by hand from the closed forms (math.*, fp64)."""
import math

import pytest
import torch

from vespo_megatron.objectives import AGG_MODES, compute_policy_loss

L = 3  # padded response length
PAD_LP, PAD_OLD = -5.0, -1.0
# (sequence advantage, [(log π_θ, lr = log π_θ − log π_old)]) per row. Row 0 (A>0) has a token above 1+ε, row 1
# (A<0) one below 1−ε and one above the dual-clip bound c = 3, rows 2 and 3 stay inside the clip range.
ROWS = [
    (1.0, [(-0.5, 0.3), (-1.0, -0.1), (-0.2, 0.05)]),
    (-0.5, [(-0.8, -0.5), (-2.0, 1.5)]),
    (0.25, [(-1.2, 0.02)]),
    (-0.5, [(-0.7, 0.1), (-0.4, -0.05)]),
]
# log π_old − log μ per response token: TIS weights exp(.) capped at 2 (row 0 token 0 is capped); the MIS sequence
# ratios are e^0.8 = 2.23 (row 0, dropped by [0.5, 2]), e^0.35, e^-0.4, e^0.02.
OLD_MINUS_ROLLOUT = [[0.9, -0.2, 0.1], [0.05, 0.3], [-0.4], [0.0, 0.02]]


def make_batch(rows=ROWS, offsets=OLD_MINUS_ROLLOUT):
    b = len(rows)
    lp = torch.full((b, L), PAD_LP, dtype=torch.float64)
    old = torch.full((b, L), PAD_OLD, dtype=torch.float64)
    roll = torch.full((b, L), PAD_OLD, dtype=torch.float64)
    adv = torch.zeros(b, L, dtype=torch.float64)
    mask = torch.zeros(b, L, dtype=torch.float64)
    for i, (a, tokens) in enumerate(rows):
        for t, (log_prob, lr) in enumerate(tokens):
            lp[i, t], old[i, t], roll[i, t] = log_prob, log_prob - lr, log_prob - lr - offsets[i][t]
            adv[i, t], mask[i, t] = a, 1.0
    return lp.requires_grad_(), old, roll, adv, mask


def clip(x, lo, hi):
    return min(max(x, lo), hi)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def reference(name, rows=ROWS, offsets=OLD_MINUS_ROLLOUT, tis=False, mis=False, **hp):
    """Per row: (per-token losses, Jacobian J[t][t'] = ∂loss_t/∂logπ_t'), or None when MIS drops the row."""
    out = []
    for (a, tokens), off in zip(rows, offsets):
        n = len(tokens)
        lp = [tok[0] for tok in tokens]
        lr = [clip(tok[1], -20, 20) for tok in tokens]
        rho = [min(math.exp(clip(d, -20, 20)), 2.0) if tis else 1.0 for d in off]
        if mis and not 0.5 <= math.exp(clip(sum(off), -20, 20)) <= 2.0:
            out.append(None)
            continue
        loss, jac = [0.0] * n, [[0.0] * n for _ in range(n)]
        if name.startswith("vespo"):
            s = sum(lr) + (sum(clip(math.log(max(r, 1e-8)), -20, 20) for r in rho) if tis else 0.0)
            g = {"vespo": 1.0, "vespo-lin": n, "vespo-sqrt": math.sqrt(n)}[name]
            w = math.exp(clip(s / g, -20, 20))
            c1, c2 = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
            phi = math.exp(c2 + c1 * math.log(max(w, 1e-8)) - c2 * w)
            for t in range(n):
                loss[t], jac[t][t] = -phi * a * lp[t], -phi * a
        elif name == "grpo":
            lo, hi, c = hp.get("eps_low", 0.2), hp.get("eps_high", 0.2), hp.get("clip_c", 3.0)
            for t in range(n):
                r = math.exp(lr[t]) * rho[t]
                l1, l2 = -a * r, -a * clip(r, 1 - lo, 1 + hi)
                loss[t], jac[t][t] = (l1, -a * r) if l1 >= l2 else (l2, 0.0)
                if a < 0 and loss[t] > -a * c:
                    loss[t], jac[t][t] = -a * c, 0.0
        elif name == "gspo":
            lo, hi = hp.get("eps_low", 3e-4), hp.get("eps_high", 4e-4)
            s = math.exp(min(sum(tok[1] for tok in tokens) / n, 10.0))
            for t in range(n):
                st = s * rho[t]
                l1, l2 = -a * st, -a * clip(st, 1 - lo, 1 + hi)
                loss[t] = max(l1, l2)
                if l1 >= l2:  # unclipped (equal inside the clip range)
                    for u in range(n):
                        if hp.get("gspo_form", "token") == "sequence":
                            jac[t][u] = -a * st / n
                        elif u == t:
                            jac[t][u] = -a * st
        elif name == "sapo":
            tau = 1.0 if a > 0 else 1.05
            for t in range(n):
                r = math.exp(lr[t]) * rho[t]
                sig = sigmoid(tau * (r - 1.0))
                loss[t], jac[t][t] = -sig * 4.0 / tau * a, -a * 4.0 * sig * (1 - sig) * r
        elif name == "cispo":
            for t in range(n):
                cr = clip(math.exp(lr[t]), 0.8, 1.2)
                loss[t], jac[t][t] = -cr * a * lp[t] * rho[t], -cr * a * rho[t]
        out.append((loss, jac))
    return out


def reference_aggregate(per_row, mode):
    """(loss, grad [rows][L]) of the reference per-token losses under the aggregation mode."""
    kept = [r for r in per_row if r is not None]
    tokens, seqs = sum(len(r[0]) for r in kept), len(kept)
    total, grad = 0.0, [[0.0] * L for _ in per_row]
    for i, row in enumerate(per_row):
        if row is None:
            continue
        loss, jac = row
        n = len(loss)
        weight = {"token-mean": 1 / tokens, "seq-mean-token-sum": 1 / seqs,
                  "seq-mean-token-mean": 1 / ((n + 1e-8) * seqs), "seq-mean-token-sum-norm": 1 / L}[mode]
        total += weight * sum(loss)
        for u in range(n):
            grad[i][u] = weight * sum(jac[t][u] for t in range(n))
    return total, grad


def run(name, mode="token-mean", tis=False, mis=False, **hp):
    lp, old, roll, adv, mask = make_batch()
    loss, metrics = compute_policy_loss(name, lp, old, adv, mask, mode, rollout_log_prob=roll, tis=tis, mis=mis, **hp)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.item(), grad, metrics


CASES = [
    ("vespo", {}), ("vespo-lin", {}), ("vespo-sqrt", {}),
    ("grpo", {}), ("grpo", {"eps_high": 0.28}), ("grpo", {"clip_c": 10.0}),
    ("gspo", {}), ("gspo", {"gspo_form": "sequence"}), ("gspo", {"eps_low": 0.2, "eps_high": 0.2}),
    ("sapo", {}), ("cispo", {}),
]


@pytest.mark.parametrize("option", ["plain", "tis", "mis"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name, hp", CASES)
def test_loss_and_gradient_match_hand_computation(name, hp, mode, option):
    flags = {"tis": option == "tis", "mis": option == "mis"}
    loss, grad, _ = run(name, mode, honour_agg_mode=True, **flags, **hp)
    expected, expected_grad = reference_aggregate(reference(name, **flags, **hp), mode)
    assert loss == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert torch.allclose(grad, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["gspo", "sapo"])
def test_gspo_and_sapo_force_seq_mean_token_mean_like_the_fork(name):
    forced, _, _ = run(name, "token-mean")
    assert forced == pytest.approx(reference_aggregate(reference(name), "seq-mean-token-mean")[0], rel=1e-12)
    honoured, _, _ = run(name, "token-mean", honour_agg_mode=True)
    assert honoured == pytest.approx(reference_aggregate(reference(name), "token-mean")[0], rel=1e-12)


def test_hand_cases_cover_every_clip_branch():
    per_row = reference("grpo")
    jac = [[row[1][t][t] for t in range(len(row[0]))] for row in per_row]
    assert jac[0][0] == 0.0 and jac[1][0] == 0.0 and jac[1][1] == 0.0  # upper clip, lower clip, dual clip
    assert per_row[1][0][1] == pytest.approx(1.5)  # dual clip: −A·c with A = −0.5, c = 3
    assert all(g != 0.0 for g in jac[2] + jac[3])


@pytest.mark.parametrize("offset, clipped", [(-1e-7, False), (1e-7, True)])
def test_grpo_upper_clip_boundary(offset, clipped):
    rows = [(1.0, [(-0.5, math.log(1.2) + offset)])]
    lp, old, _, adv, mask = make_batch(rows, [[0.0]])
    loss, _ = compute_policy_loss("grpo", lp, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)  # continuous across the boundary
    assert float(grad[0, 0]) == (0.0 if clipped else pytest.approx(-math.exp(math.log(1.2) + offset), rel=1e-12))


@pytest.mark.parametrize("offset, dual", [(-1e-7, False), (1e-7, True)])
def test_grpo_dual_clip_boundary(offset, dual):
    rows = [(-1.0, [(-2.0, math.log(3.0) + offset)])]
    lp, old, _, adv, mask = make_batch(rows, [[0.0]])
    loss, _ = compute_policy_loss("grpo", lp, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(3.0, abs=1e-6)
    assert float(grad[0, 0]) == (0.0 if dual else pytest.approx(math.exp(math.log(3.0) + offset), rel=1e-12))


def test_sapo_gate_value_and_slope_at_ratio_one():
    rows = [(1.0, [(-0.5, 0.0)]), (-1.0, [(-0.5, 0.0)])]
    lp, old, _, adv, mask = make_batch(rows, [[0.0], [0.0]])
    loss, _ = compute_policy_loss("sapo", lp, old, adv, mask, honour_agg_mode=True)
    (grad,) = torch.autograd.grad(loss, lp)
    # f(1) = 4/τ · σ(0) = 2/τ; f'(1) = 1 whatever τ: the gradient at r = 1 is that of −A·r.
    assert loss.item() == pytest.approx(0.5 * (-2.0 / 1.0 + 2.0 / 1.05), rel=1e-12)
    assert grad[:, 0].tolist() == pytest.approx([-0.5, 0.5], rel=1e-12)


def test_gspo_token_and_sequence_forms_differ_with_token_advantages():
    # Per-token advantages inside one sequence: the token form weights ∇logπ_t by its own A_t, the sequence form
    # spreads Σ_t A_t over the tokens (1/T each).
    lp, old, _, adv, mask = make_batch([(1.0, [(-0.5, 0.1), (-0.6, 0.3)])], [[0.0, 0.0]])
    adv = torch.tensor([[1.0, -2.0, 0.0]], dtype=torch.float64)
    s = math.exp(0.2)
    grads = {}
    for form in ("token", "sequence"):
        loss, _ = compute_policy_loss("gspo", lp, old, adv, mask, eps_low=0.5, eps_high=0.5, gspo_form=form,
                                      honour_agg_mode=True)
        assert loss.item() == pytest.approx((-1.0 * s + 2.0 * s) / 2, rel=1e-12)
        grads[form] = torch.autograd.grad(loss, lp)[0][0, :2].tolist()
    assert grads["token"] == pytest.approx([-s / 2, 2 * s / 2], rel=1e-12)
    assert grads["sequence"] == pytest.approx([(-s + 2 * s) / 4] * 2, rel=1e-12)


def test_vespo_metrics_follow_the_hand_values():
    _, _, metrics = run("vespo")
    phis, ws = [], []
    for a, tokens in ROWS:
        w = math.exp(sum(tok[1] for tok in tokens))
        c1, c2 = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
        ws.append(w)
        phis.append(w**c1 * math.exp(c2 * (1 - w)))
    assert metrics["vespo/w_seq_mean"] == pytest.approx(sum(ws) / 4, rel=1e-12)
    assert metrics["vespo/phi_min"] == pytest.approx(min(phis), rel=1e-12)
    assert metrics["vespo/n_neg_seq"] == 2.0 and metrics["vespo/n_pos_seq"] == 2.0
    kl = sum(-sum(tok[1] for tok in tokens) / len(tokens) for _, tokens in ROWS) / 4
    assert metrics["actor/approx_kl"] == pytest.approx(kl, rel=1e-12)


@pytest.mark.parametrize("name, hp", [("grpo", {}), ("grpo", {"eps_high": 0.28}), ("sapo", {}), ("sapo", {"tis": True}),
                                      ("gspo", {"gspo_form": "sequence", "eps_low": 0.2, "eps_high": 0.2})])
def test_gradcheck_against_finite_differences(name, hp):
    # Only losses whose value depends on log π_θ exactly as their gradient says (no detached factor).
    lp, old, roll, adv, mask = make_batch()

    def f(x):
        return compute_policy_loss(name, x, old, adv, mask, rollout_log_prob=roll, **hp)[0]

    assert torch.autograd.gradcheck(f, (lp,), eps=1e-6, atol=1e-9)
