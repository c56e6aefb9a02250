#!/usr/bin/env bash
# The CUDA path of the trainer on one GPU (H100/H200, a few minutes): the loss path, R3 replay and a bf16 step with
# Megatron's distributed optimizer compared with the CPU path on the same inputs, the log-prob and replay timings;
# prints one summary table (benchmarks/gpu_check.py) and exits non-zero when a check is off its bound.
#   VENV    the venv to build (default .venv-gpu), on top of the machine's CUDA torch (--system-site-packages)
#   WHEELS  a folder of wheels for what the machine lacks (default .whl: megatron-core and its small deps, fetched
#           beforehand where an index is reachable, e.g. pip download --no-deps --python-version 3.12
#           --only-binary=:all: megatron-core==0.16.1 -d .whl)
# Dry run without a GPU: python benchmarks/gpu_check.py --device cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
WHEELS=${WHEELS:-.whl}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
if ! "$VENV/bin/python" -c "import megatron.core" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" --no-deps megatron-core
fi
# the package itself (and its C++ packer) without touching the machine's torch
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e .
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
timeout 420 "$VENV/bin/python" benchmarks/gpu_check.py --device cuda
