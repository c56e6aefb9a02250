#!/usr/bin/env bash
# SGLang rollout server for Qwen3-30B-A3B with routed-expert capture (R3 routing replay).
#
# Run it in its OWN virtual environment: SGLang pins its own torch (and flashinfer) build, which must not replace the
# torch that Megatron-Core / Transformer Engine were built against in the training venv. Routed-expert capture needs
# a recent SGLang (0.5.7 or newer; `routed_experts_start_len` only in 2026 builds).
#   python -m venv ~/venvs/sglang && ~/venvs/sglang/bin/pip install "sglang[all]"
#
# Usage: HF_DIR=/ckpt/Qwen3-30B-A3B-Base TP=4 PORT=30000 bash launch_sglang.sh
set -euo pipefail

SGLANG_PYTHON=${SGLANG_PYTHON:-$HOME/venvs/sglang/bin/python}
HF_DIR=${HF_DIR:-/ckpt/Qwen3-30B-A3B-Base}  # the HF checkpoint (the trainer pushes its own weights at start)
TP=${TP:-4}                                 # 4 x H100 80GB: ~15 GB of bf16 weights per GPU, the rest is KV cache
PORT=${PORT:-30000}
CHUNKED_PREFILL=${CHUNKED_PREFILL:-8192}    # keep chunked prefill ON (> 0): the capture buffer is sized from it
MEM_FRACTION=${MEM_FRACTION:-0.85}
DETERMINISTIC=${DETERMINISTIC:-0}           # 1: batch-invariant kernels (slower), for exact mismatch measurements

EXTRA=()
# Radix-cache hits are not recomputed: their routing rows are those recorded when the prefix was first computed
# (maybe by another request, under the same weights). Disable the cache for exact per-request routing capture; keep it
# (KEEP_RADIX=1) to share the prompt prefill of the 8 responses per prompt, at the cost of that approximation.
if [ "${KEEP_RADIX:-0}" != 1 ]; then EXTRA+=(--disable-radix-cache); fi
if [ "$DETERMINISTIC" = 1 ]; then EXTRA+=(--enable-deterministic-inference); fi

# --enable-return-routed-experts: the server flag; each request must also ask (`return_routed_experts: true`), which
# `vespo-megatron train --routing-replay r3` does. Capture costs ~1.5 KB per token (48 layers x top-8 x int32).
exec "$SGLANG_PYTHON" -m sglang.launch_server \
  --model-path "$HF_DIR" \
  --tp "$TP" \
  --host 0.0.0.0 \
  --port "$PORT" \
  --enable-return-routed-experts \
  --chunked-prefill-size "$CHUNKED_PREFILL" \
  --mem-fraction-static "$MEM_FRACTION" \
  "${EXTRA[@]}"
