#!/usr/bin/env bash
# VESPO training of Qwen3-30B-A3B at TP 2 / EP 8 with torchrun: run this on every node (NODE_RANK 0..NNODES-1),
# in the training venv (`vespo-megatron` on PATH), after launch_sglang.sh is up and convert.sh has run.
# The GPU count must be a multiple of 8 (TP 2 x EP 8 with expert-TP 1); data parallel = GPUs / 2.
#
# Usage: N=16 NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 SGLANG_URL=http://node9:30000 bash train_torchrun.sh
set -euo pipefail

EXAMPLE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$EXAMPLE_DIR/train_args.sh"  # paths, N, and the TRAIN_ARGS flags

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron's sequence-parallel/TP overlap ordering

mkdir -p "$SAVE_DIR" "$LOG_DIR" "$TMPDIR"
# --no-python: torchrun execs the console script itself, with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set per rank;
# `vespo-megatron train` then uses those ranks instead of spawning its own.
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --no-python vespo-megatron train "${TRAIN_ARGS[@]}"
