"""File-to-file byte copies in the kernel (``os.copy_file_range``, what ``cp`` uses): the converters move tensor bytes
that need no re-layout this way, without passing them through this process's memory.

A kernel copy is fastest (about 1.4x on ext4) when source and destination offsets agree modulo the page size, as it
then moves whole pages; writers place their data with :func:`aligning_residue` to get there.
"""
from __future__ import annotations

import contextlib
import errno
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

ByteRange = tuple[Path, int, int]  # (file, offset, length)
PAGE = 4096
_FALLBACK = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def aligning_residue(pieces: Iterable[tuple[int, int, int]], align: int = 8) -> int:
    """Where data made of ``pieces`` (offset in the data, source offset, length) should start, modulo PAGE, so that
    the most bytes sit at their source's offset modulo PAGE: a multiple of ``align`` (0 when no piece allows one)."""
    weight: Counter[int] = Counter()
    for at, src, length in pieces:
        residue = (src - at) % PAGE
        if residue % align == 0:
            weight[residue] += length
    return max(sorted(weight), key=weight.__getitem__, default=0)


class Sources(contextlib.ExitStack):
    """Source files opened for reading on first use and closed when the ``with`` block ends."""

    def __init__(self) -> None:
        super().__init__()
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = self.enter_context(open(path, "rb", buffering=0)).fileno()
        return self._fds[path]


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` at the position of ``fd``."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def copy_range(src: int, dst: int, offset: int, length: int, dst_offset: int | None = None) -> None:
    """Copy bytes [offset, offset + length) of file descriptor ``src`` to ``dst`` at ``dst_offset`` (None: at the
    position of ``dst``, which advances): in the kernel where the platform and file systems allow it, else through
    an 8 MiB buffer."""
    try:
        while length > 0:
            n = os.copy_file_range(src, dst, length, offset, dst_offset)
            if n == 0:
                raise OSError(errno.EIO, f"source ends {length} bytes early")
            offset, length = offset + n, length - n
            dst_offset = None if dst_offset is None else dst_offset + n
        return
    except AttributeError:  # no copy_file_range on this platform
        pass
    except OSError as err:
        if err.errno not in _FALLBACK:
            raise
    while length > 0:
        chunk = os.pread(src, min(length, 8 << 20), offset)
        if not chunk:
            raise OSError(errno.EIO, f"source ends {length} bytes early")
        if dst_offset is None:
            write_all(dst, chunk)
        else:
            view = memoryview(chunk)
            while view:
                n = os.pwrite(dst, view, dst_offset)
                view, dst_offset = view[n:], dst_offset + n
        offset, length = offset + len(chunk), length - len(chunk)
