#!/usr/bin/env bash
# The README's demo command: set up the environment, then run the CPU demo end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/vespo-megatron demo "$@"
