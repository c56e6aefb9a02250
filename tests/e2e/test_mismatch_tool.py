"""The mismatch tool end to end on a tiny random Qwen3-MoE (hidden 64, 4 layers with layer 1 dense, 8 experts top-2,
vocab 256, initializer_range 0.2) saved with transformers' save_pretrained.

- CLI, bf16 CPU engine vs fp32 Megatron: replay on routes every response token like the rollout (disagreement
  exactly 0) and lowers the k3 KL; the JSON, the table and the 3 plots are written.
- Python API, fp32 engine at temperature 0.7 vs fp32 Megatron: both passes agree to rounding (a token or routing
  misalignment, or a missing 1/T on the training logits, would not), and without 1/T they do not.
- TP2 × EP2 on 2 gloo ranks gives the 1-rank figures on the same rollouts.
- --sglang-url: the same engine behind the SGLang HTTP protocol gives the same report as the in-process engine.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vespo_megatron.hf_config import load_hf_config
from vespo_megatron import cli
from vespo_megatron.mismatch.align import trace_spec
from vespo_megatron.mismatch.inputs import rollout_client, synthetic_prompts
from vespo_megatron.mismatch.report import DELTA_PLOT, JSON_NAME, LOG_W_PLOT, ROUTING_PLOT
from vespo_megatron.mismatch.score import REPLAY_OFF, REPLAY_ON, measure_mismatch
from vespo_megatron.rollout.hf_engine import HFEngine
from vespo_megatron.rollout.server import RolloutServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
              norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=512, initializer_range=0.2)
ROLLOUT = dict(num_prompts=6, prompt_len=8, n_samples_per_prompt=2, max_new_tokens=16, seed=0)
MOE_LAYERS = 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf")
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **CONFIG)).save_pretrained(path)
    return path


def _run_cli(hf_dir, out, *extra: str) -> tuple[int, str]:
    """(exit status, stdout) of the CLI with the ROLLOUT settings, default bf16 engine and fp32 training."""
    flags = [arg for key, value in ROLLOUT.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(["mismatch", "--hf-checkpoint", str(hf_dir), "--output-dir", str(out), *flags, *extra])
    return status, stdout.getvalue()


@pytest.fixture(scope="module")
def cli_run(hf_dir, tmp_path_factory):
    """(exit status, stdout, output dir) of the CLI with the in-process engine."""
    out = tmp_path_factory.mktemp("mismatch")
    return (*_run_cli(hf_dir, out), out)


def _summary(columns: dict) -> str:
    return "\n".join(f"{name}: k3 {m['kl/k3']:.3g}, mean |Δ| {m['logp/abs_diff_mean']:.3g}, routing per MoE layer "
                     f"{[round(x, 4) for x in m['routing/layer_disagree_frac']]}" for name, m in columns.items())


def test_cli_replay_on_removes_routing_mismatch_and_lowers_kl(cli_run):
    status, stdout, out = cli_run
    assert status == 0
    columns = json.loads((out / JSON_NAME).read_text())
    print(f"\nbf16 engine vs fp32 Megatron:\n{_summary(columns)}")
    off, on = columns[REPLAY_OFF], columns[REPLAY_ON]
    tokens = ROLLOUT["num_prompts"] * ROLLOUT["n_samples_per_prompt"] * ROLLOUT["max_new_tokens"]
    assert off["count/tokens"] == on["count/tokens"] == tokens
    assert on["routing/layer_disagree_frac"] == [0.0] * MOE_LAYERS
    assert on["routing/any_layer_disagree_frac"] == 0.0
    assert off["routing/any_layer_disagree_frac"] > 0  # bf16 routes some tokens differently from fp32
    assert 0 < on["kl/k3"] < off["kl/k3"]
    for plot in (DELTA_PLOT, LOG_W_PLOT, ROUTING_PLOT):
        assert (out / plot).stat().st_size > 0
    header = stdout.splitlines()[0].split()
    assert header[0] == "metric" and REPLAY_OFF.split()[0] in header
    assert any(line.startswith("kl/k3 ") for line in stdout.splitlines())


def test_fp32_engine_at_temperature_matches_fp32_training(hf_dir):
    spec = trace_spec(load_hf_config(hf_dir))
    client = rollout_client(hf_dir, spec, engine_dtype="fp32")
    records = client.generate(synthetic_prompts(4, 5, CONFIG["vocab_size"], seed=1),
                              {"max_new_tokens": 8, "temperature": 0.7}, samples_per_prompt=2, seed=1,
                              return_routed_experts=True)
    columns = measure_mismatch(hf_dir, records, temperature=0.7, micro_batch_size=3)
    print(f"\nfp32 engine vs fp32 Megatron at T = 0.7:\n{_summary(columns)}")
    for metrics in columns.values():
        assert metrics["count/tokens"] == 4 * 2 * 8
        assert metrics["kl/k3"] < 1e-8 and metrics["logp/abs_diff_max"] < 1e-4
        assert metrics["routing/any_layer_disagree_frac"] == 0.0
    without = measure_mismatch(hf_dir, records, temperature=1.0, micro_batch_size=3)
    assert without[REPLAY_OFF]["logp/abs_diff_mean"] > 1e-2  # the training logits must be divided by T


def test_tp2_ep2_gives_the_one_rank_figures(hf_dir, cli_run):
    one = json.loads((cli_run[2] / JSON_NAME).read_text())
    spec = trace_spec(load_hf_config(hf_dir))
    records = rollout_client(hf_dir, spec).generate(  # the CLI's rollouts: same prompts, engine and seeds
        synthetic_prompts(ROLLOUT["num_prompts"], ROLLOUT["prompt_len"], CONFIG["vocab_size"], ROLLOUT["seed"]),
        {"max_new_tokens": ROLLOUT["max_new_tokens"], "temperature": 1.0},
        samples_per_prompt=ROLLOUT["n_samples_per_prompt"], seed=ROLLOUT["seed"], return_routed_experts=True)
    two = measure_mismatch(hf_dir, records, tensor_model_parallel_size=2, expert_model_parallel_size=2)
    print(f"\nTP2 x EP2:\n{_summary(two)}")
    for column in (REPLAY_OFF, REPLAY_ON):
        for key in ("kl/k1", "kl/k3", "logp/abs_diff_mean", "logp/abs_diff_max", "vespo/log_w_mean"):
            assert two[column][key] == pytest.approx(one[column][key], rel=1e-3, abs=1e-7), (column, key)
        np.testing.assert_allclose(two[column]["routing/layer_disagree_frac"],
                                   one[column]["routing/layer_disagree_frac"], atol=1 / 192 + 1e-12)
    assert two[REPLAY_ON]["routing/any_layer_disagree_frac"] == 0.0


def test_sglang_url_gives_the_in_process_report(hf_dir, cli_run, tmp_path):
    with RolloutServer(HFEngine.from_pretrained(str(hf_dir), dtype="bf16")) as server:
        status, _ = _run_cli(hf_dir, tmp_path, "--sglang-url", server.url)
    assert status == 0
    assert json.loads((tmp_path / JSON_NAME).read_text()) == json.loads((cli_run[2] / JSON_NAME).read_text())
