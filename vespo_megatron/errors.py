"""The error a user can fix: a flag (or positional argument, or input file) and what is wrong with it.

Library code raises :class:`UsageError` for bad input it detects before any work; the command line prints it as one
line ``vespo-megatron <cmd>: error: <flag>: <what>`` and exits 2.
"""
from __future__ import annotations


class UsageError(ValueError):
    """``UsageError(flag, what)`` renders as ``flag: what``."""

    def __init__(self, flag: str, what: str) -> None:
        self.flag, self.what = flag, what
        super().__init__(f"{flag}: {what}")
