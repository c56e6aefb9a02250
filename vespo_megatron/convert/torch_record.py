"""``torch.save`` records (the serialization of DCP's TORCH_SAVE format): their raw tensor bytes located without
loading them, and the offset at which a record will hold its tensor's bytes.

A record is a zip archive (``<prefix>/data.pkl``, ``byteorder``, ``data/<key>``, …) written with its entries stored
uncompressed; the tensor's bytes are the storage entry, 64-byte aligned inside the record.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import math
import pickle
import struct
import zipfile
from typing import BinaryIO, Iterator

import torch

_PARSE_BELOW = 64 << 10  # records of smaller tensors are parsed to find their data; in larger ones it is the largest write


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes (``torch.save`` writes the whole storage of a view)."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.contiguous().clone()


@contextlib.contextmanager
def no_zip_crc() -> Iterator[None]:
    """torch.save without the zip CRC32 (half of the write time; ``torch.load`` does not check it)."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


class FileWindow(io.RawIOBase):
    """Read-only view of bytes [start, start + length) of an open file, as its own seekable stream."""

    def __init__(self, handle: io.RawIOBase, start: int, length: int) -> None:
        super().__init__()
        self.handle, self.start, self.length, self.pos = handle, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = min(max(base + offset, 0), self.length)
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")[: self.length - self.pos]
        self.handle.seek(self.start + self.pos)
        n = self.handle.readinto(view) or 0
        self.pos += n
        return n


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _TensorPickle(pickle.Unpickler):
    """The pickle of one ``torch.save``'d plain tensor, read without building it: ((tag, dtype, storage key, location,
    numel), storage offset, size, stride). Anything but a plain tensor raises ``pickle.UnpicklingError``."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain tensor record")

    def persistent_load(self, pid):
        return pid


def contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _entry_bytes(window: BinaryIO, info: zipfile.ZipInfo) -> tuple[int, int]:
    """(offset, length) inside ``window`` of the stored bytes of zip entry ``info`` (after its local header)."""
    window.seek(info.header_offset)
    name_len, extra_len = struct.unpack("<HH", window.read(30)[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _read_entry(window: BinaryIO, info: zipfile.ZipInfo) -> bytes:
    """An uncompressed entry's bytes (no CRC check: torch.save may write the records without one)."""
    start, length = _entry_bytes(window, info)
    window.seek(start)
    return window.read(length)


def record_data(window: BinaryIO, dtype: torch.dtype, size: tuple[int, ...]) -> int | None:
    """Offset inside ``window`` (one ``torch.save`` record) of the raw bytes of its tensor, when the record holds a
    contiguous little-endian ``dtype`` tensor of ``size`` stored uncompressed; else None."""
    try:
        with zipfile.ZipFile(window) as archive:
            infos = {info.filename: info for info in archive.infolist()}
            prefix = next(name[: -len("data.pkl")] for name in infos if name.endswith("/data.pkl"))
            if any(info.compress_type != zipfile.ZIP_STORED for info in infos.values()):
                return None
            order = infos.get(prefix + "byteorder")
            if order is not None and _read_entry(window, order) != b"little":
                return None
            pickled = _read_entry(window, infos[prefix + "data.pkl"])
            (tag, stored, key, _, numel), offset, found, stride = _TensorPickle(io.BytesIO(pickled)).load()
            start, length = _entry_bytes(window, infos[f"{prefix}data/{key}"])
    except (StopIteration, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, TypeError, struct.error, EOFError):
        return None
    if (tag, stored, found, stride) != ("storage", dtype, size, contiguous_strides(size)):
        return None
    if length != numel * dtype.itemsize or offset + math.prod(size) > numel:
        return None
    return start + offset * dtype.itemsize


class _Tally(io.RawIOBase):
    """A write-only sink that counts bytes and notes where its largest write began (``torch.save`` writes a storage's
    bytes in one call): where the data of a record will start, found without copying it."""

    def __init__(self) -> None:
        super().__init__()
        self.pos, self.largest, self.largest_at = 0, -1, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.largest:
            self.largest, self.largest_at = n, self.pos
        self.pos += n
        return n


@functools.lru_cache(maxsize=256)
def data_offset(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Offset of a contiguous tensor's bytes inside its ``torch.save`` record (the same for every tensor of a shape
    and dtype: the record's header and pickle depend on nothing else). A small record is parsed; in a large one the
    data is by far the largest write, found without copying it."""
    tensor = torch.empty(shape, dtype=dtype)  # its bytes are handed over, never read
    sink = io.BytesIO() if tensor.nbytes < _PARSE_BELOW else _Tally()
    with no_zip_crc():
        torch.save(tensor, sink)
    return record_data(sink, dtype, shape) if isinstance(sink, io.BytesIO) else sink.largest_at


@functools.lru_cache(maxsize=1)
def empty_object_record() -> bytes:
    """The ``torch.save`` record of ``[None]`` (deterministic without the zip CRC)."""
    buffer = io.BytesIO()
    with no_zip_crc():
        torch.save([None], buffer)
    return buffer.getvalue()
