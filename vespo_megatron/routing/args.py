"""Command-line flags of routing replay, in Megatron-LM's style (one argument group, dashes, ``dest`` underscores).

``add_routing_replay_args(parser)`` is called by the training CLI; stdlib only, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse

REPLAY_MODES = ("off", "r2", "r3")


def add_routing_replay_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``--routing-replay {off,r2,r3}`` and ``--routing-replay-allow-missing``; returns the parser."""
    group = parser.add_argument_group(title="routing replay")
    group.add_argument(
        "--routing-replay", type=str, default="off", choices=REPLAY_MODES,
        help="MoE routing replay. off: live routing. r2: record the experts the training model picks in the "
             "old-log-prob pass and replay them in every update. r3: replay the rollout engine's experts "
             "(SGLang --enable-return-routed-experts) in the old-log-prob pass and the updates.",
    )
    group.add_argument(
        "--routing-replay-allow-missing", action="store_true",
        help="Accept rollout (row, layer) entries whose k ids are all -1: those tokens are routed live "
             "(counted in the replay health metrics). Without it such entries are an error.",
    )
    return parser
