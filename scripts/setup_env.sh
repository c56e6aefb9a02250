#!/usr/bin/env bash
# Creates a venv (once) and installs vespo-megatron with its test extras, CPU torch pinned.
#   VENV           the venv to build (default .venv)
#   MCORE_VERSION  optional: a megatron-core release installed over the one pip resolved, --no-deps
#                  --ignore-requires-python. CI's second run uses it for 0.19.2: 0.17+ declare Python >= 3.12, the
#                  only CPU torch 2.13.0 here is built for 3.11, and every file the project imports parses under 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c constraints-cpu.txt torch==2.13.0
"$VENV/bin/python" -m pip install -q -c constraints-cpu.txt -e ".[test]"
if [ -n "${MCORE_VERSION:-}" ]; then
  # triton: megatron-core 0.18+ imports it; setup.py asks for it only where pip can resolve those releases (3.12+)
  "$VENV/bin/python" -m pip install -q -c constraints-cpu.txt --no-deps --ignore-requires-python \
    "megatron-core==$MCORE_VERSION" triton
fi
