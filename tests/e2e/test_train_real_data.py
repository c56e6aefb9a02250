"""A real-data run from the command line on CPU: jsonl prompts with a chat template, the math reward through
math-verify, an eval set every 2 steps; the resumed run continues with the next unseen prompt."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vespo_megatron.train.demo import make_hf_checkpoint, make_prompt_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _train(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vespo_megatron.cli", "train", *argv], capture_output=True, text=True,
                          env=env, timeout=800)


def test_train_on_jsonl_with_math_reward_and_eval_then_resume(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "hf", seed=0)
    train, evals = make_prompt_data(tmp_path, seed=0, num_train=10, num_eval=3)
    common = ["--hf-checkpoint", str(hf), "--prompt-data", str(train), "--input-key", "prompt", "--label-key", "label",
              "--metadata-key", "metadata", "--apply-chat-template", "--reward", "math",
              "--eval-prompt-data", "arith", str(evals), "--eval-interval", "2", "--n-samples-per-eval-prompt", "2",
              "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--num-mini-batches", "2",
              "--micro-batch-size", "2", "--rollout-max-response-len", "6", "--engine-dtype", "fp32",
              "--save", str(tmp_path / "ckpt"), "--tensorboard-dir", str(tmp_path / "logs")]
    first = _train(*common, "--train-iters", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert "eval/arith/mean_reward" not in rows[0]  # evaluated after steps 2, 4, ...
    for key in ("eval/arith/mean_reward", "eval/arith/pass@1", "eval/arith/pass@2", "eval/arith/response_len"):
        assert key in rows[1], key
    assert 0 < rows[1]["eval/arith/response_len"] <= 6 and rows[1]["reward/errors"] == 0.0
    meta = json.loads((tmp_path / "ckpt" / "iter_0000002" / "meta.json").read_text())
    assert meta["data"]["consumed"] == 8 and meta["data"]["num_prompts"] == 10

    resumed = _train(*common, "--train-iters", "3", "--load", str(tmp_path / "ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    meta = json.loads((tmp_path / "ckpt" / "iter_0000003" / "meta.json").read_text())
    assert meta["data"]["consumed"] == 12  # prompts 8, 9, then the second epoch's 0, 1
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["data/epoch"] == 1.0


def test_bad_data_is_one_line_naming_the_flag_and_row(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "hf", seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1+1?", "label": "2"}\n{"prompt": "", "label": "3"}\n')
    proc = _train("--hf-checkpoint", str(hf), "--prompt-data", str(bad), "--label-key", "label", "--reward", "math")
    assert proc.returncode == 2
    assert f"--prompt-data: {bad}: row 1: 'prompt': empty prompt" in proc.stderr
