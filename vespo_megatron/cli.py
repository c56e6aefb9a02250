"""`vespo-megatron` command line.

Each sub-command lives in the module that owns its concept and exposes ``add_parser(subparsers)``, which registers
an argparse parser whose ``func(args) -> int`` does the work. Those modules import only argparse at import time, so
``--help`` stays fast; heavy imports happen inside ``func``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# Megatron-Core and torch.distributed warn about optional GPU packages and deprecations on every import, also in
# the spawned ranks; the CLI hides them unless PYTHONWARNINGS asks otherwise.
QUIET = "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning"

# sub-command -> module that defines add_parser(); the order is the order shown in --help.
SUBCOMMANDS: dict[str, str] = {
    "demo": "vespo_megatron.train.demo_cli",
    "train": "vespo_megatron.train.train_cli",
    "convert": "vespo_megatron.convert.cli",
    "mismatch": "vespo_megatron.train.mismatch_cli",
    "serve": "vespo_megatron.rollout.server_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vespo-megatron",
        description="VESPO off-policy RL for Megatron-Core MoE models: training, routing replay, conversion.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue  # sub-command not built yet in this checkout
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if "PYTHONWARNINGS" not in os.environ:
        os.environ["PYTHONWARNINGS"] = QUIET  # inherited by spawned ranks
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
