"""`vespo-megatron demo`: the CPU demo end to end (see vespo_megatron/train/demo.py)."""
from __future__ import annotations

import argparse

MARKER = ".vespo-demo"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="CPU demo: tiny MoE, real conversion, real rollouts, VESPO with R3 replay, mismatch report")
    parser.add_argument("--workdir", default="runs/demo", help="where checkpoints, logs and the report go")
    parser.add_argument("--steps", type=int, default=4, help="training steps")
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks (EP2 needs 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    work = Path(args.workdir)
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).is_file():
            from vespo_megatron.errors import UsageError

            raise UsageError("--workdir", f"{work} is not empty and was not made by the demo; choose another directory")
        shutil.rmtree(work)  # a previous demo run: start fresh
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by vespo-megatron demo\n")
    from vespo_megatron.train.demo import run_demo

    result = run_demo(args.workdir, steps=args.steps, nproc=args.nproc, seed=args.seed)
    from vespo_megatron.mismatch.report import format_table

    print(format_table(result["mismatch"]), flush=True)
    return 0
