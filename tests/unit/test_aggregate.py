"""Aggregation modes against hand values; global normalisers make micro-batch contributions add up exactly."""
import pytest
import torch

from vespo_megatron.objectives import AGG_MODES, aggregate_loss, compute_policy_loss

TOKEN_LOSS = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 0.0], dtype=torch.float64)
SEQ_IDS = torch.tensor([0, 0, 0, 1, 1, 2])
COUNTS = torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64)  # sequence 2 has no response token: not counted


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        ("token-mean", {}, 15 / 5),
        ("token-mean", {"global_num_tokens": 10}, 15 / 10),
        ("seq-mean-token-sum", {}, (6 + 9) / 2),
        ("seq-mean-token-sum", {"global_num_seqs": 6}, (6 + 9) / 6),
        ("seq-mean-token-mean", {}, (6 / (3 + 1e-8) + 9 / (2 + 1e-8)) / 2),
        ("seq-mean-token-mean", {"global_num_seqs": 4}, (6 / (3 + 1e-8) + 9 / (2 + 1e-8)) / 4),
        ("seq-mean-token-sum-norm", {"loss_scale_factor": 4}, 15 / 4),
    ],
)
def test_modes_match_hand_values(mode, kwargs, expected):
    value = aggregate_loss(TOKEN_LOSS, SEQ_IDS, COUNTS, mode, **kwargs)
    assert value.item() == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_no_trained_token_gives_zero_not_nan(mode):
    value = aggregate_loss(torch.zeros(3, dtype=torch.float64), torch.tensor([0, 0, 1]),
                           torch.zeros(2, dtype=torch.float64), mode, loss_scale_factor=2)
    assert value.item() == 0.0


def global_batch():
    gen = torch.Generator().manual_seed(3)
    lp = -0.1 - torch.rand(6, 5, generator=gen, dtype=torch.float64)
    old = (lp + 0.2 * torch.randn(6, 5, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    mask = torch.ones(6, 5, dtype=torch.float64)
    for row, length in enumerate([5, 1, 3, 2, 5, 4]):
        mask[row, length:] = 0
    adv = torch.tensor([[1.0], [-1.0], [0.5], [-0.5], [2.0], [-2.0]], dtype=torch.float64) * mask
    return lp, old, adv, mask


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", ["vespo", "grpo"])
def test_global_normaliser_makes_micro_batches_add_up(name, mode):
    lp, old, adv, mask = global_batch()
    whole, _ = compute_policy_loss(name, lp, old, adv, mask, mode)
    norms = {"global_num_tokens": float(mask.sum()), "global_num_seqs": 6.0}
    split = [slice(0, 2), slice(2, 6)]  # micro-batches of 6 and 14 tokens
    parts = [compute_policy_loss(name, lp[s], old[s], adv[s], mask[s], mode, **norms)[0] for s in split]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), rel=1e-12)
    if mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        # Official per-micro-batch normalisation (mean of the micro-batch values) is not the global value.
        official = [compute_policy_loss(name, lp[s], old[s], adv[s], mask[s], mode)[0] for s in split]
        assert ((official[0] + official[1]) / 2).item() != pytest.approx(whole.item(), rel=1e-3)


def test_sum_norm_defaults_to_padded_response_length():
    lp, old, adv, mask = global_batch()
    default, _ = compute_policy_loss("grpo", lp, old, adv, mask, "seq-mean-token-sum-norm")
    explicit, _ = compute_policy_loss("grpo", lp, old, adv, mask, "seq-mean-token-sum-norm", loss_scale_factor=5)
    token_sum, _ = compute_policy_loss("grpo", lp, old, adv, mask, "token-mean", global_num_tokens=1.0)
    assert default.item() == explicit.item() == pytest.approx(token_sum.item() / 5, rel=1e-15)
