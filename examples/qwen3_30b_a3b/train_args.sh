# Sourced by train_torchrun.sh and train_slurm.sbatch: the paper's Qwen3-30B-A3B setup as `vespo-megatron train`
# flags (VESPO arXiv 2602.10693: lr 1e-6 constant, Adam (0.9, 0.999), wd 0.01, grad clip 1.0, 8 responses per
# prompt, mini-batches of 256 prompts, 1 epoch, TP 2 / EP 8). Only assignments here: sourcing has no side effects.

HF_DIR=${HF_DIR:-/ckpt/Qwen3-30B-A3B-Base}          # HF config (+ the weights when MCORE_DIR is not given)
WORK=${WORK:-/shared/vespo}                           # a filesystem every node and the SGLang host can read
MCORE_DIR=${MCORE_DIR:-$WORK/mcore/qwen3-30b-a3b}     # written by convert.sh
SGLANG_URL=${SGLANG_URL:-http://sglang-host:30000}    # launch_sglang.sh
N=${N:-16}                                            # staleness N = gbs/mbs: 4, 16, 32 or 64 in the paper
MINI_BATCH_PROMPTS=256                                # one optimizer step per 256 prompts (x 8 responses)
ROLLOUT_BATCH=$((N * MINI_BATCH_PROMPTS))             # prompts per rollout step: N mini-batches of 256
GLOBAL_BATCH=$((MINI_BATCH_PROMPTS * 8))              # samples per optimizer step: 256 prompts x 8 responses
TP=${TP:-2}                                           # must equal convert.sh's TP (vocabulary padding)
EP=${EP:-8}
# r3: replay the experts SGLang chose (needs --enable-return-routed-experts on the server).
# r2: replay the experts the trainer chose in its own π_old forward (no capture needed on the server).
REPLAY=${REPLAY:-r3}
TRAIN_ITERS=${TRAIN_ITERS:-500}
RUN_DIR=${RUN_DIR:-$WORK/runs/vespo-n$N-$REPLAY}
SAVE_DIR=$RUN_DIR/checkpoints                         # iter_<n>/model is torch_dist: export with mcore-to-hf
LOG_DIR=$RUN_DIR/logs                                 # --tensorboard-dir: event files + metrics.jsonl
SAVE_INTERVAL=${SAVE_INTERVAL:-50}
# Weight sync by disk: every training rank writes its shards of the HF safetensors under $TMPDIR and the server
# reloads them, so the SGLang host and every training node must see this directory.
export TMPDIR=${STAGING_DIR:-$WORK/staging}

TRAIN_ARGS=(
  --hf-checkpoint "$HF_DIR"
  --mcore-checkpoint "$MCORE_DIR"
  --sglang-url "$SGLANG_URL"
  --weight-sync disk
  # Megatron-LM's layout and kernel flags, Megatron-LM's meanings
  --tensor-model-parallel-size "$TP"
  --sequence-parallel
  --expert-model-parallel-size "$EP"
  --expert-tensor-parallel-size 1
  --pipeline-model-parallel-size 1
  --context-parallel-size 1
  --transformer-impl transformer_engine
  --moe-grouped-gemm
  --moe-token-dispatcher-type alltoall
  --bf16
  --use-distributed-optimizer
  --recompute-granularity full
  --recompute-method uniform
  --recompute-num-layers 1
  --loss vespo
  # the official (c1, c2) by advantage sign: A >= 0 -> (2, 3), A < 0 -> (3, 2) (also the defaults)
  --loss-hparam c1_pos=2.0 --loss-hparam c2_pos=3.0
  --loss-hparam c1_neg=3.0 --loss-hparam c2_neg=2.0
  --routing-replay "$REPLAY"
  --rollout-batch-size "$ROLLOUT_BATCH"
  --n-samples-per-prompt 8
  # samples per optimizer step (Megatron-LM's meaning): N = ROLLOUT_BATCH x 8 / GLOBAL_BATCH optimizer steps per step
  --global-batch-size "$GLOBAL_BATCH"
  --micro-batch-size 2
  --max-new-tokens 15360
  --temperature 1.0
  --lr 1e-6
  --min-lr 1e-6
  --lr-decay-style constant
  --lr-warmup-iters 0
  --adam-beta1 0.9
  --adam-beta2 0.999
  --weight-decay 0.01
  --clip-grad 1.0
  --seed 1234
  --train-iters "$TRAIN_ITERS"
  --save "$SAVE_DIR"
  --save-interval "$SAVE_INTERVAL"
  --tensorboard-dir "$LOG_DIR"
  --log-interval 1
)
# Micro-batches by a token budget instead of 2 samples each (every rank runs the same number of micro-batches):
# TRAIN_ARGS+=(--use-dynamic-batch-size --max-tokens-per-gpu 20480 --max-prompt-len 4096)
# The default loss normalisation is the exact global token-mean; uncomment to reproduce the official code's
# per-micro-batch token-mean instead.
# TRAIN_ARGS+=(--official-aggregation)
if [ -e "$SAVE_DIR/latest" ]; then TRAIN_ARGS+=(--load "$SAVE_DIR"); fi  # resume where the last run stopped
