#!/usr/bin/env python
"""HF <-> Megatron-Core checkpoint conversion (same actions as ``vespo-megatron convert``).

    python tools/convert_checkpoint.py hf-to-mcore HF_DIR MCORE_DIR [--tp 2 --ep 4] [--dry-run] [--resume]
    python tools/convert_checkpoint.py mcore-to-hf MCORE_DIR HF_DIR
    python tools/convert_checkpoint.py verify A B [--logits]
"""
import sys

from vespo_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
