"""Logging handlers of the command line, also in the ranks it spawns.

``configure(level)``: records on stderr, one line each; ``level`` for vespo-megatron's loggers, warnings only from
other packages (megatron-core logs at INFO) unless the level is debug. The level travels to spawned ranks in the
``VESPO_LOG_LEVEL`` environment variable; ``configure_from_env()`` (called by every spawned rank) applies it there.
"""
from __future__ import annotations

import logging
import os
import sys

ENV = "VESPO_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error")


def configure(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"log level: one of {LEVELS}, got {level!r}")
    os.environ[ENV] = level
    logging.basicConfig(level=logging.DEBUG if level == "debug" else logging.WARNING,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    logging.getLogger("vespo_megatron").setLevel(getattr(logging, level.upper()))


def configure_from_env() -> None:
    """Apply the parent command's level in a spawned rank (no-op when the parent set none)."""
    level = os.environ.get(ENV)
    if level in LEVELS:
        configure(level)
