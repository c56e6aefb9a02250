#!/usr/bin/env bash
# Qwen3-30B-A3B: HF safetensors -> Megatron-Core torch_dist checkpoint for `vespo-megatron train --mcore-checkpoint`,
# checked bitwise against the source, and the way back to HF for export. Runs on one CPU host, streamed layer by layer
# (peak host memory ~ one layer: 128 experts x 3 x 2048 x 768 x 2 bytes ~ 1.2 GB in bf16); no GPU needed.
#
# Usage: HF_DIR=/ckpt/Qwen3-30B-A3B-Base WORK=/shared/vespo bash convert.sh
set -euo pipefail

HF_DIR=${HF_DIR:-/ckpt/Qwen3-30B-A3B-Base}
WORK=${WORK:-/shared/vespo}
MCORE_DIR=${MCORE_DIR:-$WORK/mcore/qwen3-30b-a3b}
EXPORT_DIR=${EXPORT_DIR:-$WORK/hf-export/qwen3-30b-a3b}
TP=${TP:-2}  # must equal the training TP: the vocabulary is padded to a multiple of 128 x TP
EP=${EP:-8}  # checked against the model (128 experts / EP); the torch_dist checkpoint itself is layout-free
DTYPE=${DTYPE:-keep}  # keep the shipped bf16 (bitwise verify needs it); the fp32 trainer upcasts on load

# 1. The plan: files, tensors, bytes and the peak-memory estimate; writes nothing.
vespo-megatron convert hf-to-mcore "$HF_DIR" "$MCORE_DIR" --tp "$TP" --ep "$EP" --dtype "$DTYPE" --dry-run

# 2. The conversion. Atomic shard writes + a journal: after a crash, rerun with --resume to continue.
vespo-megatron convert hf-to-mcore "$HF_DIR" "$MCORE_DIR" \
  --tp "$TP" --ep "$EP" --dtype "$DTYPE"

# 3. Every Megatron tensor mapped back to HF names and compared bitwise with the source (exit 1 if any differs).
#    Add --logits to also compare HF and Megatron logits (builds both models: needs ~2 x 61 GB of host memory).
vespo-megatron convert verify "$HF_DIR" "$MCORE_DIR"

# 4. Export (here the converted checkpoint; after training use $SAVE/iter_<n>/model), then a bitwise round-trip check.
vespo-megatron convert mcore-to-hf "$MCORE_DIR" "$EXPORT_DIR" --hf-config "$HF_DIR" --max-shard-size 4GiB
vespo-megatron convert verify "$HF_DIR" "$EXPORT_DIR"
