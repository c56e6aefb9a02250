"""scripts/gpu_check.sh's Python part, dry-run on CPU (both sides on the CPU path): every row of its table is within its
bound and the timings are printed, so the script the GPU check runs is itself tested here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_on_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    table = out.stdout.splitlines()
    assert table[0] == "gpu_check: cpu vs cpu"
    checks = [line for line in table[2:] if line.rstrip().endswith(("yes", "NO"))]
    assert len(checks) == 7 and all(line.rstrip().endswith("yes") for line in checks), out.stdout
    assert any(line.startswith("logprob fwd+bwd ms") for line in table)
    assert any(line.startswith("forward ms replay/live") for line in table)
