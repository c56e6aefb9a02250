"""The KL / entropy regularisers in the Megatron loss (1 rank, fp64): the loss and its logits gradient equal the pure
policy loss + the token-mean of ``regularizer_per_token`` written out here from log_softmax; the logged kl_loss /
entropy_loss are the token-means of kl_t and H_t; a missing reference is a clear error."""
import pytest
import torch

from tests.distributed.parallel_cases import make_samples
from tests.distributed.test_loss_assembly import _padded
from vespo_megatron.megatron.batch import micro_batch
from vespo_megatron.megatron.loss import LossSettings, policy_loss
from vespo_megatron.megatron.parallel import init_parallel, spawn
from vespo_megatron.objectives import KL_LOSS_TYPES, compute_policy_loss
from vespo_megatron.packing.reference import pack

pytestmark = pytest.mark.slow

VOCAB, KL_COEF, ENT_COEF = 64, 0.1, 0.01
CASES = [(name, kind) for name in ("vespo", "grpo") for kind in KL_LOSS_TYPES]


def _hand_kl(logp: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    """The estimators as the docs state them (δ = log π_ref − log π)."""
    delta = ref - logp
    if kind == "k1":
        return logp - ref
    if kind in ("k2", "mse"):
        return delta**2 / 2
    delta = delta.clamp(-20, 20)
    return (torch.exp(delta) - delta - 1).clamp(-10, 10)


def compare_rank(rank: int) -> dict:
    init_parallel()
    samples = make_samples(6, seed=5, vocab=VOCAB)
    mb = micro_batch(pack(samples, cp=1, sp=1))
    gen = torch.Generator().manual_seed(3)
    t = mb.tokens.numel()
    mb.old_log_prob = -torch.rand(t, generator=gen, dtype=torch.float64) * 4 - 0.5
    mb.ref_log_prob = -torch.rand(t, generator=gen, dtype=torch.float64) * 4 - 0.5
    mb.global_tokens, mb.global_seqs = float(mb.loss_mask.sum()), float(mb.num_seqs)
    logits = torch.randn(1, t, VOCAB, generator=gen, dtype=torch.float64)
    mask = mb.loss_mask
    out = {}
    for name, kind in CASES:
        settings = LossSettings(name=name, kl_coef=KL_COEF, kl_loss_type=kind, entropy_coef=ENT_COEF)
        meg_logits = logits.clone().requires_grad_(True)
        loss_meg, _, metrics = policy_loss(meg_logits.clone(), mb, settings, VOCAB, num_microbatches=1)
        loss_meg.backward()
        # the same from scratch: pure policy loss without regulariser + hand regulariser, token-mean over the mask
        pure_logits = logits.clone().requires_grad_(True)
        logq = torch.log_softmax(pure_logits[0], dim=-1)
        logp = logq.gather(1, mb.labels[:, None])[:, 0]
        entropy = -(logq.exp() * logq).sum(-1)
        width = max(len(s.response) for s in samples)
        policy, _ = compute_policy_loss(name, _padded(mb, logp, width), _padded(mb, mb.old_log_prob, width),
                                        _padded(mb, mb.advantages, width), _padded(mb, mask, width))
        kl = _hand_kl(logp, mb.ref_log_prob, kind)
        hand = policy + ((KL_COEF * kl - ENT_COEF * entropy) * mask).sum() / mask.sum()
        hand.backward()
        out[(name, kind)] = dict(
            meg=float(loss_meg), hand=float(hand), policy=float(policy),
            grad_diff=float((meg_logits.grad - pure_logits.grad).abs().max()),
            grad_scale=float(pure_logits.grad.abs().max()),
            kl_loss=(metrics["kl_loss"], float((kl.detach() * mask).sum() / mask.sum())),
            entropy_loss=(metrics["entropy_loss"], float((entropy.detach() * mask).sum() / mask.sum())),
        )
    mb.ref_log_prob = None
    try:
        policy_loss(logits.clone(), mb, LossSettings(kl_coef=0.1), VOCAB, num_microbatches=1)
        out["missing_ref"] = None
    except ValueError as err:
        out["missing_ref"] = str(err)
    return out


@pytest.fixture(scope="module")
def results():
    return spawn(compare_rank, 1)[0]


@pytest.mark.parametrize("name, kind", CASES)
def test_megatron_loss_equals_policy_plus_hand_regularizer(results, name, kind):
    r = results[(name, kind)]
    assert abs(r["hand"] - r["policy"]) > 1e-3  # the regulariser changes the loss
    assert abs(r["meg"] - r["hand"]) <= 1e-12 * max(1.0, abs(r["hand"])), (r["meg"], r["hand"])
    assert r["grad_diff"] <= 1e-12 * max(1.0, r["grad_scale"]), r["grad_diff"]
    for key in ("kl_loss", "entropy_loss"):
        got, want = r[key]
        assert want > 0 or kind == "k1"
        assert abs(got - want) <= 1e-12 * max(1.0, abs(want)), (key, got, want)


def test_kl_without_reference_log_probs_is_an_error(results):
    assert results["missing_ref"] is not None and "ref_log_prob: missing; --kl-coef" in results["missing_ref"]


@pytest.mark.parametrize("change, message", [
    (dict(kl_loss_type="k4"), "--kl-loss-type: unknown type 'k4'"),
    (dict(kl_coef=-0.1), "--kl-coef: must be a finite number >= 0"),
    (dict(entropy_coef=float("nan")), "--entropy-coef: must be a finite number"),
])
def test_bad_settings(change, message):
    with pytest.raises(ValueError, match=message):
        LossSettings(**change)
