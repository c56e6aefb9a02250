#!/usr/bin/env bash
# The README's test command: the whole suite against the oldest and the newest supported megatron-core release.
#   .venv           what pip resolves here: megatron-core 0.16.1 (0.17+ declare Python >= 3.12; this machine's CPU
#                   torch 2.13.0 exists only for Python 3.11)
#   .venv-mcore019  the same, with megatron-core 0.19.2 installed over it --no-deps --ignore-requires-python (+ triton)
# Both runs record their 1-rank reference numbers in $VESPO_MCORE_NUMBERS; the second compares them with the first
# (tests/distributed/test_cross_version.py). Arguments go to both pytest runs. Exits non-zero if either run fails.
set -uo pipefail
cd "$(dirname "$0")/.."
NEWEST=0.19.2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export VESPO_MCORE_NUMBERS=${VESPO_MCORE_NUMBERS:-$PWD/runs/mcore-numbers}
rm -rf "$VESPO_MCORE_NUMBERS"
mkdir -p runs
bash scripts/setup_env.sh || exit 1
# the second venv is built while the first run tests (the install is mostly waiting on disk and network)
VENV=.venv-mcore019 MCORE_VERSION=$NEWEST bash scripts/setup_env.sh > runs/setup-mcore019.log 2>&1 &
setup=$!
status=0
run() {
  echo "== megatron-core $("$1/bin/python" -c 'import importlib.metadata as m; print(m.version("megatron-core"))'): the \
whole suite in $1"
  "$1/bin/python" -m pytest -q --timeout=900 tests "${@:2}" || status=1
}
run .venv "$@"
if wait "$setup"; then
  run .venv-mcore019 "$@"
else
  cat runs/setup-mcore019.log
  echo "setting up .venv-mcore019 (megatron-core $NEWEST) failed"
  status=1
fi
exit $status
