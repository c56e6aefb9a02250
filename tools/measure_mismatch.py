#!/usr/bin/env python
"""Train-inference mismatch, routing replay off vs on (same arguments as ``vespo-megatron mismatch``).

    python tools/measure_mismatch.py --hf-checkpoint HF_DIR --output-dir OUT [--sglang-url URL] [--engine-dtype bf16]
        [--train-dtype fp32] [--num-prompts 8 --prompt-len 16 --max-new-tokens 32] [--tensor-model-parallel-size 2]
"""
import sys

from vespo_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["mismatch", *sys.argv[1:]]))
