"""The README's demo, as a user runs it (the CLI in a subprocess): trains, converts both ways, reports mismatch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_demo_end_to_end(tmp_path):
    work = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vespo_megatron.cli", "demo", "--workdir", str(work), "--steps", "2"],
                          capture_output=True, text=True, env=env, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr  # the table on stdout; stage and metric lines are log records (stderr)
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "step    0", "step    1", "kl/k3", "eval/arith/pass@1"):
        assert stage in out, stage
    report = json.loads((work / "mismatch" / "mismatch.json").read_text())
    off, on = report["replay off"], report["replay on (R3)"]
    assert on["routing/any_layer_disagree_frac"] == 0.0 < off["routing/any_layer_disagree_frac"]
    assert on["kl/k3"] < off["kl/k3"]
    assert (work / "hf_trained" / "config.json").is_file() and (work / "mcore" / "metadata.json").is_file()
    rows = [json.loads(line) for line in (work / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["eval/arith/response_len"] > 0  # evaluated after step 2
    assert (work / "hf" / "tokenizer.json").is_file() and (work / "arith_train.jsonl").is_file()
