"""Atomic output files and the resume journal of a conversion.

Every output file is written under a temporary name and renamed into place (``os.replace`` is atomic), so the
destination never holds a partial file. The journal lives in ``DEST/.vespo-convert/``: ``plan.json`` (the fingerprint
of the source and the options) and ``done/<unit>.pkl`` for every finished unit (its payload, e.g. the dist-checkpoint
metadata of the unit's file), each written atomically after the unit's output file. A killed run restarted with
``resume=True`` skips the finished units and redoes the rest; the final index/metadata files are written last and the
journal is removed, so a directory without ``.vespo-convert/`` is complete.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable

from vespo_megatron.convert.errors import ConversionError

JOURNAL_DIR = ".vespo-convert"


def atomic_write(path: Path, write: Callable[[Path], None], tmp_dir: Path | None = None, fsync: bool = False) -> None:
    """Run ``write(tmp)`` on a temporary path next to ``path`` (or in ``tmp_dir``), then rename it to ``path``."""
    tmp = (tmp_dir or path.parent) / f".tmp-{path.name}"
    write(tmp)
    if fsync:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes, tmp_dir: Path | None = None, fsync: bool = False) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), tmp_dir, fsync)


def source_fingerprint(paths: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every source file: a changed source invalidates a journal."""
    out = []
    for path in sorted(paths):
        stat = path.stat()
        out.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return out


class Journal:
    """Validates the destination on construction (nothing is written); :meth:`begin` creates it."""

    def __init__(self, dest: str | Path, plan: dict[str, Any], resume: bool) -> None:
        self.dest = Path(dest)
        self.dir = self.dest / JOURNAL_DIR
        self.plan = json.loads(json.dumps(plan))  # normalised (tuples -> lists) for comparison with the stored one
        if self.dest.exists() and not self.dest.is_dir():
            raise ConversionError("output path exists and is not a directory", file=self.dest)
        entries = [p.name for p in self.dest.iterdir()] if self.dest.is_dir() else []
        self.resuming = False
        if entries:
            stored = self.dir / "plan.json"
            if not resume:
                raise ConversionError("output directory is not empty (pass --resume to continue an interrupted run)", file=self.dest)
            if not stored.is_file():
                raise ConversionError("output directory is not empty and holds no conversion journal to resume", file=self.dest)
            if json.loads(stored.read_text()) != self.plan:
                raise ConversionError("the journal was written for another source or other options; cannot resume", file=stored)
            self.resuming = True

    def begin(self, fsync: bool = False) -> None:
        (self.dir / "done").mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        if not self.resuming:
            atomic_write_bytes(self.dir / "plan.json", json.dumps(self.plan, indent=1).encode(), self.tmp, fsync)

    @property
    def tmp(self) -> Path:
        """Where temporary files go before being renamed into place."""
        return self.dir / "tmp"

    def _marker(self, unit: int) -> Path:
        return self.dir / "done" / f"{unit:06d}.pkl"

    def is_done(self, unit: int) -> bool:
        return self._marker(unit).is_file()

    def payload(self, unit: int) -> Any:
        return pickle.loads(self._marker(unit).read_bytes())

    def mark(self, unit: int, payload: Any = None, fsync: bool = False) -> None:
        atomic_write_bytes(self._marker(unit), pickle.dumps(payload), self.tmp, fsync)

    def finish(self) -> None:
        shutil.rmtree(self.dir)
