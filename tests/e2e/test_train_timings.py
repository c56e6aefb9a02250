"""A 4-step CPU run logs the per-stage timings and the throughput of every step to metrics.jsonl and TensorBoard
(read back from the event file), and the learning rate follows Megatron-Core's schedule (hand values)."""
from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.train.config import TrainConfig
from vespo_megatron.train.logger import MetricsLogger
from vespo_megatron.train.run import run_training
from vespo_megatron.train.timing import STAGES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
KEYS = [f"timing/{stage}" for stage in STAGES] + ["throughput/tokens_per_s", "throughput/samples_per_s"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("timings")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_hf_config("qwen3_moe", vocab_size=32)).save_pretrained(root / "hf")
    # N = 2 optimizer steps per RL step, 8 in all: warm-up over 2, then linear decay 1e-3 -> 1e-4 over the other 6
    cfg = TrainConfig(hf_checkpoint=str(root / "hf"), rollout_batch_size=4, n_samples_per_prompt=2,
                      global_batch_size=4, micro_batch_size=2, max_new_tokens=4, train_iters=4, engine_dtype="fp32",
                      lr=1e-3, min_lr=1e-4, lr_decay_style="linear", lr_warmup_iters=2,
                      tensorboard_dir=str(root / "tb"))
    history = run_training(cfg, world_size=2, quiet=True)
    return root / "tb", history


def test_every_step_logs_the_timings_to_jsonl(run):
    logdir, history = run
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    for row in rows:
        assert all(key in row for key in KEYS), sorted(set(KEYS) - set(row))
        parts = sum(row[f"timing/{stage}"] for stage in STAGES if stage != "step")
        assert all(row[f"timing/{stage}"] >= 0 for stage in STAGES)
        assert row["timing/step"] > 0 and parts <= row["timing/step"] * (1 + 1e-6)
        assert row["timing/update"] > 0 and row["timing/old_logp"] > 0 and row["timing/weight_sync"] > 0
        assert row["throughput/samples_per_s"] == pytest.approx(8 / row["timing/step"], rel=1e-9)
        assert row["throughput/tokens_per_s"] > row["throughput/samples_per_s"]
    assert [row["step"] for row in rows] == [it for it, _ in history]


def test_tensorboard_event_file_holds_the_timings(run):
    logdir, _ = run
    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert set(KEYS) <= tags, sorted(set(KEYS) - tags)
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    for key in KEYS:
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [0, 1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in rows], rel=1e-6)


def test_progress_line_shows_the_timings(run):
    _, history = run
    line = MetricsLogger.line(*history[0])
    assert "step=" in line and "update=" in line and "tok/s" in line and "samples/s" in line


def test_lr_follows_megatron_core_schedule(run):
    """lr of the last optimizer step k = 2i + 1 of RL step i: warm-up k/2 · 1e-3 (k ≤ 2), then
    1e-4 + (1 − (k − 2)/6) · 9e-4."""
    _, history = run
    expected = [5e-4, 1e-4 + (5 / 6) * 9e-4, 1e-4 + (3 / 6) * 9e-4, 1e-4 + (1 / 6) * 9e-4]
    assert [m["lr"] for _, m in history] == pytest.approx(expected, rel=1e-12)
