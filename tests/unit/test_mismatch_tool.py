"""The mismatch tool's assembly on hand-made records and training passes, against docs/mismatch.md by hand.

Two samples over a model of 3 HF layers (layer 1 dense), 4 experts, top-2:
  A: prompt [5, 6, 7], response [8, 9];   B: prompt [1, 2], response [3, 4, 5].
The training log-prob entry p scores token p+1 and routing row p is token p's forward, so response token j is scored
by entry/row P − 1 + j. Prompt entries hold −50 (a misalignment would show as a huge Δ) and the rollout's dense
column holds the invalid set [0, 0] (taking it would raise).
"""
import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from vespo_megatron.mismatch import cli as mismatch_cli
from vespo_megatron.mismatch.align import TrainSide, align, training_side
from vespo_megatron.mismatch.inputs import read_prompts, synthetic_prompts
from vespo_megatron.mismatch.report import (
    DELTA_PLOT, JSON_NAME, LOG_W_PLOT, ROUTING_PLOT, TABLE_NAME, column_metrics, format_table, report,
)
from vespo_megatron.mismatch.score import REPLAY_OFF, REPLAY_ON, measure_mismatch
from vespo_megatron.packing import Sample, pack
from vespo_megatron.rollout.records import RolloutRecord
from vespo_megatron.routing.trace import TraceSpec

SPEC = TraceSpec(num_hf_layers=3, moe_layers=(0, 2), num_experts=4, topk=2)
PROMPTS, RESPONSES = ([5, 6, 7], [1, 2]), ([8, 9], [3, 4, 5])
MU = ([-1.0, -2.0], [-0.5, -1.25, -3.0])
DELTA = ([0.2, -0.1], [0.0, 1.0, -2.0])  # logπ − logμ per response token
PROMPT_LOGP = -50.0


def _rollout_routing(n_rows: int) -> np.ndarray:
    """[n_rows, 3, 2]: MoE layers 0 and 2 route row r to {r, r+1} mod 4; dense layer 1 is zeros."""
    out = np.zeros((n_rows, 3, 2), np.int32)
    for r in range(n_rows):
        out[r, [0, 2]] = [r % 4, (r + 1) % 4]
    return out


def _records(start_len: int = 0) -> list[RolloutRecord]:
    return [RolloutRecord(rid=f"req-{i}", prompt_ids=np.array(p), response_ids=np.array(r),
                          logprobs=np.array(mu, np.float32), routing=_rollout_routing(len(p) + len(r) - 1),
                          routed_experts_start_len=start_len, finish_reason={"type": "length"}, weight_version=None)
            for i, (p, r, mu) in enumerate(zip(PROMPTS, RESPONSES, MU))]


def _train_side() -> TrainSide:
    """Entries/rows as in the module docstring, with these routing differences from the rollout:
    A row 0 (prompt, ignored) both layers; A row 2 layer 0 the same set reversed (no difference), layer 1 differs;
    A row 4 (last token, no rollout row, ignored); B row 0 (prompt, ignored); B row 1 layer 0; B row 3 both layers."""
    logprobs, routing = [], []
    for p, r, mu, delta in zip(PROMPTS, RESPONSES, MU, DELTA):
        logprobs.append(np.array([PROMPT_LOGP] * (len(p) - 1) + [m + d for m, d in zip(mu, delta)]))
        rows = _rollout_routing(len(p) + len(r))[:, [0, 2]].astype(np.int64)
        routing.append(rows)
    a, b = routing
    a[0] = [[2, 3], [2, 3]]
    a[2, 0] = a[2, 0][::-1]
    a[2, 1] = [0, 1]
    a[4] = [[0, 3], [0, 3]]
    b[0] = [[2, 3], [2, 3]]
    b[1, 0] = [0, 3]
    b[3] = [[1, 2], [1, 2]]
    return TrainSide(logprobs, routing)


def test_align_takes_the_response_tokens_scored_by_the_previous_forward():
    a = align(_records(), _train_side(), SPEC)
    np.testing.assert_allclose(a.logp_rollout, [-1.0, -2.0, -0.5, -1.25, -3.0])
    np.testing.assert_allclose(a.logp_train - a.logp_rollout, [0.2, -0.1, 0.0, 1.0, -2.0], atol=1e-6)
    np.testing.assert_array_equal(a.seq_ids, [0, 0, 1, 1, 1])
    # rollout rows 2, 3 of A and 1, 2, 3 of B, MoE columns only: {r, r+1} mod 4
    want = [[[r % 4, (r + 1) % 4]] * 2 for r in (2, 3, 1, 2, 3)]
    np.testing.assert_array_equal(a.experts_rollout, want)
    assert a.experts_train.shape == (5, 2, 2)
    np.testing.assert_array_equal(a.experts_train[0, 1], [0, 1])  # A row 2, layer 2


def test_metrics_follow_the_formulas_on_the_hand_made_case():
    metrics, samples = column_metrics(_records(), _train_side(), SPEC)
    d = [0.2, -0.1, 0.0, 1.0, -2.0]
    n = len(d)
    assert metrics["count/tokens"] == 5 and metrics["count/seqs"] == 2
    assert metrics["kl/k1"] == pytest.approx(-sum(d) / n, abs=1e-6)
    assert metrics["kl/k2"] == pytest.approx(sum(x * x / 2 for x in d) / n, rel=1e-5)
    assert metrics["kl/k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / n, rel=1e-5)
    assert metrics["logp/abs_diff_mean"] == pytest.approx(3.3 / 5, rel=1e-5)
    assert metrics["logp/abs_diff_max"] == pytest.approx(2.0, rel=1e-5)
    assert metrics["logp/extreme_frac_tau2"] == pytest.approx(2 / 5)  # |Δ| > ln 2: 1.0 and 2.0
    assert metrics["logp/extreme_frac_tau5"] == pytest.approx(1 / 5)  # |Δ| > ln 5: 2.0
    assert metrics["logp/token_mult_prob_error"] == pytest.approx(sum(math.exp(abs(x)) for x in d) / n, rel=1e-5)
    mu = [-1.0, -2.0, -0.5, -1.25, -3.0]
    assert metrics["prob/abs_diff_max"] == pytest.approx(max(abs(math.exp(m + x) - math.exp(m)) for m, x in zip(mu, d)),
                                                         rel=1e-5)
    # −mean_t logp per sequence, then the mean over sequences; logπ = μ + Δ = A [-0.8, -2.1], B [-0.5, -0.25, -5.0]
    assert metrics["ppl/log_ppl_train"] == pytest.approx((2.9 / 2 + 5.75 / 3) / 2, rel=1e-5)
    assert metrics["ppl/log_ppl_rollout"] == pytest.approx((3.0 / 2 + 4.75 / 3) / 2, rel=1e-6)
    log_w = [0.1, -1.0]  # Σ_t Δ of A and of B
    np.testing.assert_allclose(samples.log_w, log_w, atol=1e-6)
    assert metrics["chi2/seq"] == pytest.approx(sum(math.exp(2 * x) for x in log_w) / 2 - 1, rel=1e-5)
    # routing over A rows 2, 3 and B rows 1, 2, 3: layer 0 differs at B1, B3; layer 2 at A2, B3
    np.testing.assert_allclose(metrics["routing/layer_disagree_frac"], [2 / 5, 2 / 5])
    assert metrics["routing/any_layer_disagree_frac"] == pytest.approx(3 / 5)
    assert metrics["routing/mean_layers_disagree"] == pytest.approx(4 / 5)


def test_report_writes_both_columns_table_json_and_three_plots(tmp_path):
    exact = TrainSide([np.concatenate([lp[:-len(mu)], mu]) for lp, mu in zip(_train_side().logprobs, MU)],
                      [np.concatenate([r.routing[:, [0, 2]], r.routing[-1:, [0, 2]]]) for r in _records()])
    columns = report(_records(), {REPLAY_OFF: _train_side(), REPLAY_ON: exact}, SPEC, tmp_path)
    assert columns[REPLAY_ON]["kl/k3"] == 0.0 and columns[REPLAY_ON]["routing/any_layer_disagree_frac"] == 0.0
    assert columns[REPLAY_OFF]["kl/k3"] > 0
    assert json.loads((tmp_path / JSON_NAME).read_text()) == columns
    for plot in (DELTA_PLOT, LOG_W_PLOT, ROUTING_PLOT):
        assert (tmp_path / plot).stat().st_size > 0
    table = (tmp_path / TABLE_NAME).read_text()
    assert table == format_table(columns) + "\n"
    header = table.splitlines()[0]
    assert REPLAY_OFF in header and REPLAY_ON in header


def test_training_side_puts_slots_back_in_sample_order_and_drops_the_last_entry():
    """Slot values 1000·sample + position through two micro-batches (samples out of order, SP 2) come back per sample
    in token order; the log-probs lose their last entry (the last token scores nothing)."""
    rng = np.random.default_rng(0)
    lens = [(3, 2), (2, 4), (4, 1), (1, 3)]
    samples = [Sample(prompt=rng.integers(0, 9, p), response=rng.integers(0, 9, r)) for p, r in lens]
    groups = [[2, 0], [3, 1]]
    batches = [pack([samples[i] for i in ids], sp=2, sample_ids=ids) for ids in groups]
    slots = [np.where(b.seq_index[0] >= 0, 1000 * b.sample_ids[np.maximum(b.seq_index[0], 0)] + b.position_ids[0], -1)
             for b in batches]
    side = training_side(batches, [s.astype(float) for s in slots], [np.stack([s, s], -1)[:, None] for s in slots], 4)
    for i, (p, r) in enumerate(lens):
        np.testing.assert_array_equal(side.logprobs[i], 1000 * i + np.arange(p + r - 1))
        np.testing.assert_array_equal(side.routing[i][:, 0, 0], 1000 * i + np.arange(p + r))


@pytest.mark.parametrize("change, message", [
    (lambda recs, side: recs.__setitem__(1, replace(recs[1], routing=None)),
     r"sample 1 \(request req-1\): no routing"),
    (lambda recs, side: recs.__setitem__(0, _records(start_len=2)[0]),
     r"sample 0 \(request req-0\): routing starts at row 2"),
    (lambda recs, side: recs.__setitem__(1, replace(recs[1], routing=recs[1].routing[:-1])),
     r"sample 1 \(request req-1\): routing of shape \(3, 3, 2\)"),
    (lambda recs, side: side.logprobs.__setitem__(0, side.logprobs[0][1:]),
     r"sample 0 \(request req-0\): training log-probs of shape \(3,\)"),
    (lambda recs, side: side.routing.__setitem__(1, side.routing[1][:, :1]),
     r"sample 1 \(request req-1\): training routing of shape \(5, 1, 2\)"),
    (lambda recs, side: side.logprobs.pop(), "1 log-prob and 2 routing arrays for 2 records"),
])
def test_bad_inputs_name_the_sample(change, message):
    records, side = _records(), _train_side()
    change(records, side)
    with pytest.raises(ValueError, match=message):
        align(records, side, SPEC)


@pytest.mark.parametrize("kwargs, message", [
    (dict(train_dtype="fp16"), "train_dtype"),
    (dict(tensor_model_parallel_size=0), "tensor_model_parallel_size"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(temperature=0.0), "temperature"),
])
def test_measure_mismatch_rejects_bad_settings_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_mismatch(tmp_path / "missing", _records(), **kwargs)
    with pytest.raises(ValueError, match="no rollout"):
        measure_mismatch(tmp_path / "missing", [])


def test_prompt_sources(tmp_path):
    prompts = synthetic_prompts(5, 7, 11, seed=3)
    assert prompts == synthetic_prompts(5, 7, 11, seed=3) != synthetic_prompts(5, 7, 11, seed=4)
    assert len(prompts) == 5 and {len(p) for p in prompts} == {7}
    assert all(0 <= t < 11 for p in prompts for t in p)
    path = tmp_path / "prompts.jsonl"
    path.write_text("[1, 2, 3]\n\n[4]\n")
    assert read_prompts(path, 5) == [[1, 2, 3], [4]]
    for text, message in (("[1, 2]\n[1, 9]\n", "line 2: expected"), ("[1]\n{\n", "line 2: not JSON"),
                          ("[]\n", "line 1: expected"), ("\n", "no prompt")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_prompts(path, 5)


def test_cli_parser_and_light_import():
    import argparse

    parser = argparse.ArgumentParser()
    mismatch_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["mismatch", "--hf-checkpoint", "hf", "--output-dir", "out",
                              "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"])
    assert (args.func, args.engine_dtype, args.train_dtype, args.sglang_url) == (mismatch_cli.run, "bf16", "fp32", None)
    assert (args.tensor_model_parallel_size, args.expert_model_parallel_size) == (2, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["mismatch", "--hf-checkpoint", "hf", "--output-dir", "out", "--train-dtype", "fp16"])
    code = "import sys, vespo_megatron.mismatch.cli; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
