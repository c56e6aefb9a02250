"""Request bookkeeping of the CPU engine: which requests run, pause/continue and abort, as SGLang 0.5.23 does them.

- ``/flush_cache`` succeeds only when no request is running or waiting (``running`` = 0);
- ``/pause_generation`` {mode}: ``abort`` aborts every request in flight; ``retract`` and ``in_place`` hold them at
  their next decode step (the engine then drops the sequence's KV cache and recomputes it after ``continue``, as a
  retracted request is recomputed). New requests wait until ``/continue_generation``;
- ``/abort_request`` {rid, abort_all}: the request ends with ``finish_reason`` {"type": "abort"}.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

PAUSE_MODES = ("abort", "retract", "in_place")


class GenerationControl:
    """Thread-safe state shared by the engine's generation loop and the server's control routes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: set[str] = set()
        self._aborted: set[str] = set()
        self._paused = False

    @property
    def running(self) -> int:
        """Requests admitted and not finished (running or waiting for the model)."""
        with self._cond:
            return len(self._running)

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused

    @contextlib.contextmanager
    def track(self, rid: str) -> Iterator[None]:
        """Count ``rid`` as running for the duration of the block."""
        with self._cond:
            self._running.add(rid)
        try:
            yield
        finally:
            with self._cond:
                self._running.discard(rid)
                self._aborted.discard(rid)
                self._cond.notify_all()

    def wait_while_paused(self) -> None:
        """Block until generation is not paused."""
        with self._cond:
            self._cond.wait_for(lambda: not self._paused)

    def pause(self, mode: str = "abort") -> None:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause_generation mode must be one of {list(PAUSE_MODES)}, got {mode!r}")
        with self._cond:
            self._paused = True
            if mode == "abort":
                self._aborted |= self._running

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def abort(self, rid: str = "", abort_all: bool = False) -> None:
        """Abort ``rid`` (if it runs) or every running request."""
        with self._cond:
            self._aborted |= set(self._running) if abort_all else ({rid} & self._running)
            self._cond.notify_all()

    def is_aborted(self, rid: str) -> bool:
        with self._cond:
            return rid in self._aborted
