"""Configuration of the slime VESPO loss from slime's args, and its errors (each names the arg or batch field).

The numbers of the loss are tested on real gloo ranks in tests/distributed/test_integration_slime.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vespo_megatron.integrations.slime import loss_config, response_layout, vespo_loss
from vespo_megatron.objectives import PolicyLossConfig


def test_paper_defaults_when_absent_and_slime_names_when_given():
    assert loss_config(SimpleNamespace()) == PolicyLossConfig()
    assert loss_config(SimpleNamespace(vespo_k_pos=None, use_tis=False)) == PolicyLossConfig()
    cfg = loss_config(SimpleNamespace(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.0,
                                      use_tis=True, tis_clip=3.0, tis_clip_low=0.0))
    assert (cfg.c1_pos, cfg.c2_pos, cfg.c1_neg, cfg.c2_neg, cfg.tis, cfg.tis_cap) == (1.5, 2.5, 2.5, 1.0, True, 3.0)


@pytest.mark.parametrize("args, message", [
    (dict(vespo_k_poss=2.0), r"vespo_k_poss: unknown VESPO argument; known: vespo_k_pos"),
    (dict(vespo_k_pos=-1.0), r"vespo_k_pos: must be >= 0, got -1"),
    (dict(vespo_lambda_neg="2"), r"vespo_lambda_neg: must be >= 0, got '2'"),
    (dict(use_tis=True, tis_clip=0.0), r"tis_clip: must be > 0, got 0"),
    (dict(use_tis=True, tis_clip_low=0.5), r"tis_clip_low: VESPO's TIS has no lower clip"),
    (dict(use_tis=True, use_rollout_logprobs=True), r"use_tis: with use_rollout_logprobs"),
    (dict(use_kl_loss=True), r"use_kl_loss: not supported by the VESPO custom loss"),
    (dict(allgather_cp=True), r"allgather_cp: not supported by the VESPO custom loss"),
    (dict(custom_tis_function_path="m.f"), r"custom_tis_function_path: not supported"),
])
def test_bad_configuration_names_the_arg(args, message):
    with pytest.raises(ValueError, match=message):
        loss_config(SimpleNamespace(**args))


def _batch() -> dict:
    return {"unconcat_tokens": [torch.arange(6)], "total_lengths": [6], "response_lengths": [3],
            "loss_masks": [torch.ones(3, dtype=torch.int)], "advantages": [torch.ones(3)],
            "log_probs": [torch.full((3,), -1.0)], "rollout_log_probs": None}


@pytest.mark.parametrize("flag", ["use_tis", "use_rollout_logprobs"])
def test_missing_rollout_log_probs_name_the_field(flag):
    with pytest.raises(ValueError, match=rf"rollout_log_probs: missing from the batch; {flag} needs"):
        vespo_loss(SimpleNamespace(**{flag: True}), _batch(), torch.zeros(1, 8, 5), lambda x: x.sum())


def test_layout_of_one_sample_under_cp2():
    """total 10, response 4, cp 2: k = 3; rank 0 holds positions 0-2 and 9-11, rank 1 3-5 and 6-8."""
    rows, pos, ids, index = response_layout([10], [4], cp_rank=1, cp_size=2, num_rows=6)
    assert pos.tolist() == [5, 6, 7, 8] and rows.tolist() == [2, 3, 4, 5] and index.tolist() == [0, 1, 2, 3]
    rows, pos, _, _ = response_layout([10], [4], cp_rank=0, cp_size=2, num_rows=6)
    assert pos.tolist() == [] and rows.tolist() == []
    with pytest.raises(ValueError, match=r"response_lengths\[1\]: 5 must be in \[1, total_lengths\[1\]=5\)"):
        response_layout([4, 5], [2, 5], 0, 1, 16)
    with pytest.raises(ValueError, match=r"logits: 7 rows, but the samples of this micro-batch need 9"):
        response_layout([4, 5], [2, 2], 0, 1, 7)
