#!/usr/bin/env bash
# Creates .venv (once) and installs vespo-megatron with its test extras, CPU torch pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints-cpu.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[test]"

# SGLang 0.5.23's released wheel, read (never installed: it pins a CUDA torch) by tests/contract, which checks the
# rollout client and the CPU stand-in against its route table and request types; msgspec loads those types.
if ! ls .whl/sglang-0.5.23-*.whl >/dev/null 2>&1; then
  .venv/bin/python -m pip download -q --no-deps sglang==0.5.23 -d .whl
fi
.venv/bin/python -m pip install -q -c constraints-cpu.txt msgspec==0.22.0
