"""The regularisers in the one loss assembly (pure API) against hand values, their robustness, and their flags."""
import re

import pytest
import torch

from tests.unit.test_cli_errors import _run, dirs  # noqa: F401  (dirs: the fixture of the command-line cases)
from vespo_megatron.errors import UsageError
from vespo_megatron.objectives import RegularizerConfig, compute_policy_loss
from vespo_megatron.train.config import TrainConfig

# two sequences: 3 and 2 response tokens (row 1 padded by one position)
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.25, -3.0, 0.0]], dtype=torch.float64)
OLD = torch.tensor([[-1.1, -1.9, -0.5], [-0.3, -2.5, 0.0]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -2.0, -0.25], [-0.25, -2.0, 0.0]], dtype=torch.float64)
ENT = torch.tensor([[2.0, 1.0, 0.5], [1.5, 3.0, 9.0]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
ADV = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
# k1 per token: logp − ref = [0.5, 0, −0.25], [0, −1, (pad)]
K1 = torch.tensor([[0.5, 0.0, -0.25], [0.0, -1.0, 0.0]], dtype=torch.float64)


def _loss(mode: str = "token-mean", reg: RegularizerConfig | None = None, logp=LOGP, ref=REF, ent=ENT, **kw):
    logp = logp.clone().requires_grad_(True)
    ent = ent.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss("grpo", logp, OLD, ADV, MASK, mode, entropy=ent, ref_log_prob=ref,
                                        regularizer=reg, **kw)
    loss.backward()
    return loss.detach(), metrics, logp.grad, ent.grad


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_the_terms_are_aggregated_as_the_policy_loss(mode):
    plain, _, plain_grad, _ = _loss(mode)
    reg = RegularizerConfig(kl_coef=0.5, kl_loss_type="k1", entropy_coef=0.1)
    loss, metrics, grad, ent_grad = _loss(mode, reg)
    term = 0.5 * K1 - 0.1 * ENT * MASK
    if mode == "token-mean":  # Σ over the 5 response tokens / 5
        hand, kl, h = term.sum() / 5, -0.75 / 5, 8.0 / 5
        d_term = MASK / 5
    else:  # mean over 2 sequences of each sequence's token-mean
        hand = (term[0].sum() / 3 + term[1].sum() / 2) / 2
        kl, h = (0.25 / 3 + -1.0 / 2) / 2, (3.5 / 3 + 4.5 / 2) / 2
        d_term = MASK / torch.tensor([[3.0], [2.0]], dtype=torch.float64) / 2
    tol = 1e-12 if mode == "token-mean" else 1e-8  # seq-mean-token-mean divides by T_i + 1e-8
    assert float(loss - plain) == pytest.approx(float(hand), abs=tol)
    assert metrics["kl_loss"] == pytest.approx(kl, abs=tol)
    assert metrics["entropy_loss"] == pytest.approx(h, abs=tol)
    # ∂/∂logp of k1 is 1 per token; ∂/∂H is −entropy_coef; the aggregation weights d_term
    assert torch.allclose(grad - plain_grad, 0.5 * d_term, atol=1e-9)
    assert torch.allclose(ent_grad, -0.1 * d_term, atol=1e-9)


def test_non_finite_reference_or_entropy_drops_only_that_token():
    reg = RegularizerConfig(kl_coef=1.0, kl_loss_type="k2", entropy_coef=0.0)
    ref = REF.clone()
    ref[0, 1] = float("nan")
    plain, _, _, _ = _loss()
    loss, metrics, grad, _ = _loss(reg=reg, ref=ref)
    kept = 0.5 * (REF - LOGP) ** 2 * MASK
    kept[0, 1] = 0.0
    assert float(loss - plain) == pytest.approx(float(kept.sum() / 5), abs=1e-12)
    assert torch.isfinite(grad).all() and metrics["kl_loss"] == pytest.approx(float(kept.sum() / 5), abs=1e-12)


def test_a_sequence_dropped_by_mis_gets_no_regularizer():
    rollout = OLD.clone()
    rollout[1] = OLD[1] - 5.0  # sequence 1's π_old/μ ratio is e^10: MIS drops it
    reg = RegularizerConfig(kl_coef=1.0, kl_loss_type="k1")
    plain, _, _, _ = _loss(rollout_log_prob=rollout, mis=True)
    loss, metrics, grad, _ = _loss(reg=reg, rollout_log_prob=rollout, mis=True)
    assert float(loss - plain) == pytest.approx(0.25 / 3, abs=1e-12)  # only sequence 0's 3 tokens, normalised by 3
    assert torch.all(grad[1] == 0)


def test_missing_inputs_are_named():
    with pytest.raises(ValueError, match="ref_log_prob: --kl-coef needs the reference log-probs"):
        compute_policy_loss("grpo", LOGP, OLD, ADV, MASK, regularizer=RegularizerConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy: --entropy-coef needs the per-token entropy"):
        compute_policy_loss("grpo", LOGP, OLD, ADV, MASK, regularizer=RegularizerConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match=re.escape("ref_log_prob: shape (2, 2) differs")):
        compute_policy_loss("grpo", LOGP, OLD, ADV, MASK, ref_log_prob=REF[:, :2])


@pytest.mark.parametrize("change, flag, what", [
    (dict(kl_loss_type="k4"), "--kl-loss-type", "unknown type 'k4'; known: k1, k2, mse, k3, low_var_kl"),
    (dict(kl_coef=float("inf")), "--kl-coef", "must be a finite number >= 0"),
    (dict(entropy_coef=float("nan")), "--entropy-coef", "must be a finite number"),
    (dict(ref_load="/some/dir"), "--ref-load", "the reference is used only by the KL term"),
])
def test_check_flags(change, flag, what):
    with pytest.raises(UsageError) as err:
        TrainConfig(hf_checkpoint="x", **change).check_flags()
    assert err.value.flag == flag and what in err.value.what


@pytest.mark.parametrize("line, flag, what", [
    ("train --hf-checkpoint {tmp}/hf --kl-coef 0.1 --kl-loss-type k4", "--kl-loss-type", "unknown type 'k4'"),
    ("train --hf-checkpoint {tmp}/hf --kl-coef 0.1 --ref-load {tmp}/not_a_checkpoint", "--ref-load",
     "neither a Megatron distributed checkpoint"),
])
def test_command_line_error_is_one_line_without_torch(dirs, line, flag, what):  # noqa: F811
    result, stderr = _run(line.format(tmp=dirs).split())
    lines = [text for text in stderr.splitlines() if text.strip()]
    assert result["status"] == 2 and len(lines) == 1, stderr
    assert re.fullmatch(rf"vespo-megatron train: error: {re.escape(flag)}: .*{re.escape(what)}.*", lines[0]), lines
    assert result["heavy"] == [], result
