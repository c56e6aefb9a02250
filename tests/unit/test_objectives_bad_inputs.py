"""Every bad input of the objectives gives a ValueError whose message names the field."""
import pytest
import torch

from vespo_megatron.objectives import PackedPolicyInput, compute_policy_loss, packed_policy_loss


def padded(**changes):
    lp = -0.5 - torch.rand(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batch = {"log_prob": lp, "old_log_prob": lp - 0.1, "advantages": torch.ones(3, 4, dtype=torch.float64),
             "response_mask": torch.ones(3, 4, dtype=torch.float64), "rollout_log_prob": lp - 0.2}
    batch.update(changes)
    return batch


def with_value(field, index, value):
    tensor = padded()[field].clone()
    tensor[index] = value
    return {field: tensor}


PADDED_CASES = [
    ("old_log_prob", {}, dict(old_log_prob=torch.zeros(3, 5, dtype=torch.float64))),
    ("advantages", {}, dict(advantages=torch.zeros(2, 4, dtype=torch.float64))),
    ("advantages: expected a torch.Tensor", {}, dict(advantages=[[1.0] * 4] * 3)),
    ("response_mask", {}, dict(response_mask=torch.ones(3, 3))),
    ("rollout_log_prob", {}, dict(rollout_log_prob=torch.zeros(4, dtype=torch.float64))),
    ("log_prob", {}, dict(log_prob=torch.zeros(12, dtype=torch.float64))),
    ("log_prob: empty batch", {}, dict(log_prob=torch.zeros(0, 4, dtype=torch.float64),
                                       old_log_prob=torch.zeros(0, 4, dtype=torch.float64),
                                       advantages=torch.zeros(0, 4, dtype=torch.float64),
                                       response_mask=torch.zeros(0, 4), rollout_log_prob=None)),
    ("response_mask: row 1", {}, with_value("response_mask", 1, 0.0)),
    ("response_mask", {}, with_value("response_mask", (0, 1), 0.5)),
    ("log_prob: log-probability above 0", {}, with_value("log_prob", (2, 3), 0.01)),
    ("old_log_prob: log-probability above 0", {}, with_value("old_log_prob", (0, 0), 0.5)),
    ("rollout_log_prob: log-probability above 0", {"tis": True}, with_value("rollout_log_prob", (0, 0), 0.5)),
    ("advantages: non-finite", {}, with_value("advantages", (1, 2), float("nan"))),
    ("rollout_log_prob: required", {"tis": True}, dict(rollout_log_prob=None)),
    ("rollout_log_prob: required", {"mis": True}, dict(rollout_log_prob=None)),
    ("c1_pos", {"c1_pos": -1.0}, {}),
    ("c2_neg", {"c2_neg": -0.5}, {}),
    ("k_neg (alias of c1_neg)", {"k_neg": -1.0}, {}),
    ("lambda_pos (alias of c2_pos)", {"lambda_pos": float("nan")}, {}),
    ("eps_low", {"eps_low": 1.0}, {}),
    ("eps_low", {"eps_low": -0.1}, {}),
    ("eps_high", {"eps_high": -0.01}, {}),
    ("clip_c", {"clip_c": 1.0}, {}),
    ("clip_ratio_c (alias of clip_c)", {"clip_ratio_c": 0.5}, {}),
    ("mis_high", {"mis": True, "mis_low": 2.0, "mis_high": 2.0}, {}),
    ("mis_low", {"mis": True, "mis_low": -1.0}, {}),
    ("tis_cap", {"tis": True, "tis_cap": 0.0}, {}),
    ("tau_neg", {"tau_neg": 0.0}, {}),
    ("gspo_form", {"gspo_form": "geometric"}, {}),
    ("tis", {"tis": "yes"}, {}),
    ("eps: unknown policy-loss hyper-parameter", {"eps": 0.2}, {}),
    ("c1_pos: sets c1_pos, already set by k_pos", {"k_pos": 2.0, "c1_pos": 2.0}, {}),
    ("loss_agg_mode: unknown mode", {"loss_agg_mode": "mean"}, {}),
    ("global_num_tokens", {"global_num_tokens": 0}, {}),
    ("global_num_seqs", {"global_num_seqs": -3.0, "loss_agg_mode": "seq-mean-token-sum"}, {}),
    ("loss_scale_factor", {"loss_scale_factor": float("inf")}, {}),
]


@pytest.mark.parametrize("message, hparams, changes", PADDED_CASES, ids=[c[0] for c in PADDED_CASES])
def test_padded_api_rejects(message, hparams, changes):
    batch = padded(**changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compute_policy_loss("vespo", **batch, **hparams)


def test_unknown_loss_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"name: unknown policy loss 'ppo'; known: vespo, vespo-lin, .*cispo"):
        compute_policy_loss("ppo", **padded())


def test_log_probs_within_rounding_of_zero_and_non_finite_ones_are_accepted():
    batch = padded(**with_value("log_prob", (0, 0), 5e-5))
    batch["old_log_prob"][1, 1] = float("inf")
    loss, _ = compute_policy_loss("grpo", **batch)
    assert torch.isfinite(loss)


def packed(**changes):
    n = 5
    fields = dict(log_prob=torch.full((n,), -0.5, dtype=torch.float64), old_log_prob=torch.full((n,), -0.6),
                  advantages=torch.ones(n), response_mask=torch.ones(n), seq_ids=torch.tensor([0, 0, 1, 1, 1]),
                  seq_advantages=torch.tensor([1.0, -1.0]), num_seqs=2)
    fields.update(changes)
    return fields


PACKED_CASES = [
    ("seq_ids: values must lie in", dict(seq_ids=torch.tensor([0, 0, 1, 1, 2]))),
    ("seq_ids: values must lie in", dict(seq_ids=torch.tensor([0, -1, 1, 1, 1]))),
    ("seq_ids: dtype", dict(seq_ids=torch.tensor([0.0, 0, 1, 1, 1]))),
    ("seq_advantages: shape", dict(seq_advantages=torch.tensor([1.0, -1.0, 0.5]))),
    ("seq_advantages: non-finite", dict(seq_advantages=torch.tensor([1.0, float("inf")]))),
    ("num_seqs", dict(num_seqs=0)),
    ("old_log_prob: expected a torch.Tensor", dict(old_log_prob=None)),
    ("log_prob: expected a floating-point", dict(log_prob=torch.zeros(5, dtype=torch.int64))),
    ("log_prob: empty batch", dict(log_prob=torch.zeros(0), old_log_prob=torch.zeros(0), advantages=torch.zeros(0),
                                   response_mask=torch.zeros(0), seq_ids=torch.zeros(0, dtype=torch.int64))),
    ("entropy: shape", dict(entropy=torch.zeros(4))),
    ("seq_sum: must be callable", dict(seq_sum=3)),
]


@pytest.mark.parametrize("message, changes", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_packed_input_rejects(message, changes):
    with pytest.raises(ValueError, match=message):
        PackedPolicyInput(**packed(**changes))


def test_packed_batch_without_any_response_token():
    inp = PackedPolicyInput(**packed(response_mask=torch.zeros(5)))
    with pytest.raises(ValueError, match="response_mask: no response token in the batch"):
        packed_policy_loss("vespo", inp)


def test_packed_sum_norm_needs_loss_scale_factor():
    with pytest.raises(ValueError, match="loss_scale_factor: required"):
        packed_policy_loss("grpo", PackedPolicyInput(**packed()), "seq-mean-token-sum-norm")


def test_seq_sum_returning_a_wrong_shape():
    inp = PackedPolicyInput(**packed(seq_sum=lambda local: local.sum(dim=0)))
    with pytest.raises(ValueError, match=r"seq_sum: returned \(2,\), expected a tensor of shape \(3, 2\)"):
        packed_policy_loss("vespo", inp)
