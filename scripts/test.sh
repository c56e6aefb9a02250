#!/usr/bin/env bash
# The README's test command: the whole suite against the oldest and the newest supported megatron-core release.
#   .venv           what pip resolves here: megatron-core 0.16.1 (0.17+ declare Python >= 3.12; this machine's CPU
#                   torch 2.13.0 exists only for Python 3.11)
#   .venv-mcore019  the same, with megatron-core 0.19.2 installed over it --no-deps --ignore-requires-python (+ triton)
# Both runs record their 1-rank reference numbers in $VESPO_MCORE_NUMBERS; the second compares them with the first
# (tests/distributed/test_cross_version.py). Arguments go to both pytest runs. Exits non-zero if either run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
NEWEST=0.19.2
# both venvs first: an install rebuilds the C++ extension in the source tree, which a running suite has loaded
bash scripts/setup_env.sh
VENV=.venv-mcore019 MCORE_VERSION=$NEWEST bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export VESPO_MCORE_NUMBERS=${VESPO_MCORE_NUMBERS:-$PWD/runs/mcore-numbers}
rm -rf "$VESPO_MCORE_NUMBERS"
status=0
for venv in .venv .venv-mcore019; do
  echo "== megatron-core $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("megatron-core"))'):" \
    "the whole suite in $venv"
  "$venv/bin/python" -m pytest -q --timeout=900 tests "$@" || status=1
done
exit $status
