"""`vespo-megatron train`: the RL loop (flags follow Megatron-LM's names where they exist)."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from vespo_megatron.train.flags import add_train_args

    parser = subparsers.add_parser(
        "train", help="VESPO (or a baseline) RL training of an MoE model with routing replay",
        description="Prompts (a dataset or the synthetic task), rollouts from an SGLang server (or the CPU engine), "
                    "rewards, advantages, N = gbs/mbs updates per "
                    "step, weight sync. Under torchrun/srun the launched ranks are used; otherwise gloo ranks are "
                    "spawned on this machine.")
    add_train_args(parser)
    parser.add_argument("--mcore-checkpoint", default=None,
                        metavar="DIR", help="initial weights from a Megatron torch_dist checkpoint (vespo-megatron convert "
                             "hf-to-mcore); default: the HF checkpoint's weights")
    parser.add_argument("--nproc", type=int, default=None, help="local gloo ranks; default: pp·lcm(tp·cp, ep)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vespo_megatron.train.flags import config_from_args
    from vespo_megatron.train.run import run_training

    cfg = config_from_args(args)
    run_training(cfg, world_size=args.nproc, mcore_checkpoint=args.mcore_checkpoint)
    return 0
