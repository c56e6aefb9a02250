"""Megatron-Core ``torch_dist`` checkpoints, written and read one region at a time.

Format (what ``megatron.core.dist_checkpointing.save`` writes): ``metadata.json`` (backend ``torch_dist``),
``common.pt`` (non-tensor state), ``.metadata`` (a pickled torch.distributed.checkpoint ``Metadata``: per key the
global shape, dtype and chunk list, and per chunk the file, byte offset and length) and ``*.distcp`` data files in
which every chunk is one ``torch.save`` record (DCP's TORCH_SAVE serialization). A chunk at leading-axis position
``index`` of a key with global shape ``axes + shape`` is stored as a tensor [1]·len(index) + shape. The writer pads
before each record of 64 KiB or more so that its tensor's bytes start on a 4 KiB page (or, for bytes copied from
other files, at their sources' offset modulo the page).

The writer emits one data file per conversion unit plus that file's piece of the metadata; :func:`finish` merges
the pieces. The reader locates (:meth:`~DcpCheckpoint.locate`) a region that lies contiguously inside one stored
chunk (a plain little-endian tensor record, see :mod:`~vespo_megatron.convert.torch_record`) and reads its bytes
straight from the file; any other region goes through DCP's own ``FileSystemReader``, which reshards from whatever
chunks the checkpoint has (e.g. one written by Megatron under TP/EP). Memory stays at the region read.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from vespo_megatron.convert.byte_copy import PAGE, Sources, aligning_residue, copy_range
from vespo_megatron.convert.errors import ConversionError
from vespo_megatron.convert.torch_record import (
    FileWindow,
    compact,
    contiguous_strides,
    data_offset,
    empty_object_record,
    no_zip_crc,
    record_data,
)

BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}
# One written record: key, byte offset in the file, byte length, and for a tensor chunk (else None) its global shape,
# chunk offset, dtype and chunk sizes.
Piece = tuple[str, int, int, tuple | None]


_ALIGN_MIN_BYTES = 64 << 10  # smaller records are not worth a page of padding
RAW_WRITES = hasattr(torch.serialization, "skip_data")  # torch >= 2.5 can write a record without its bytes


@dataclass(frozen=True)
class RawChunk:
    """A chunk [shape] of ``dtype`` whose bytes are copied from other files: pieces (offset in the chunk's bytes, file,
    file offset, length); bytes no piece covers are zero."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[tuple[int, Path, int, int], ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def write_data_file(path: Path, chunks: Iterable[tuple[str, tuple[int, ...], tuple[int, ...], int, torch.Tensor | RawChunk]],
                    objects: Iterable[str] = ()) -> list[Piece]:
    """Write tensor chunks (key, global shape, offset, number of leading axes, tensor or :class:`RawChunk`), then the
    empty ``[None]`` objects (Megatron's ``_extra_state`` of linear layers without Transformer Engine) to ``path``;
    return the pieces. A RawChunk's record is written without its bytes (``torch.serialization.skip_data`` leaves a
    hole, which reads as zeros), which the kernel then copies in from the source files."""
    pieces: list[Piece] = []
    with open(path, "wb") as handle, no_zip_crc(), Sources() as sources:
        with ThreadPoolExecutor(max_workers=1) as copier:  # kernel copies overlap the writing of the next records
            copies = []
            for key, global_shape, offset, lead, data in chunks:
                shape = (1,) * lead + tuple(data.shape)
                raw = isinstance(data, RawChunk)
                tensor = torch.empty(shape, dtype=data.dtype) if raw else compact(data.reshape(shape))  # raw: untouched
                inner = data_offset(shape, data.dtype) if raw or tensor.nbytes >= _ALIGN_MIN_BYTES else 0
                if tensor.nbytes >= _ALIGN_MIN_BYTES:  # data on a page (raw: as its sources sit), for fast kernel copies
                    residue = aligning_residue((at, src, n) for at, _, src, n in data.pieces) if raw else 0
                    handle.write(bytes((residue - handle.tell() - inner) % PAGE))
                start = handle.tell()
                with torch.serialization.skip_data() if raw else contextlib.nullcontext():
                    torch.save(tensor, handle)
                for at, src, src_offset, length in data.pieces if raw else ():
                    copies.append(copier.submit(copy_range, sources.fd(src), handle.fileno(), src_offset, length, start + inner + at))
                pieces.append((key, start, handle.tell() - start, (global_shape, offset, tensor.dtype, tuple(tensor.shape))))
            for key in objects:
                start = handle.tell()
                handle.write(empty_object_record())
                pieces.append((key, start, handle.tell() - start, None))
        for copy in copies:
            copy.result()
    return pieces


def finish(directory: Path, files: list[tuple[str, list[Piece]]], write: callable, common: dict | None = None) -> None:
    """Write ``common.pt``, ``.metadata`` and last ``metadata.json`` for the data files (name, pieces).

    ``write(path, data: bytes)`` is the atomic writer to use. The metadata is deterministic (no ids, no timestamps).
    """
    storage: dict[MetadataIndex, _StorageInfo] = {}
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for name, pieces in files:
        for key, start, length, tensor in pieces:
            if tensor is None:
                state[key] = BytesStorageMetadata()
                storage[MetadataIndex(key)] = _StorageInfo(name, start, length)
                continue
            global_shape, offset, dtype, sizes = tensor
            entry = state.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(global_shape), []))
            entry.chunks.append(ChunkStorageMetadata(torch.Size(offset), torch.Size(sizes)))
            storage[MetadataIndex(key, offset)] = _StorageInfo(name, start, length)
    metadata = Metadata(state, storage_data=storage, storage_meta=StorageMeta(), version=CURRENT_DCP_VERSION)
    buffer = io.BytesIO()
    torch.save(common or {}, buffer)
    write(directory / "common.pt", buffer.getvalue())
    write(directory / ".metadata", pickle.dumps(metadata))
    write(directory / "metadata.json", json.dumps(BACKEND).encode())


class _RegionPlanner:
    """The two LoadPlanner hooks ``FileSystemReader.read_data`` calls: copy read pieces into one destination."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        view = self.dest
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, item: ReadItem, value: io.BytesIO) -> None:
        raise ValueError(f"{item.storage_index.fqn} is not a tensor")


class DcpCheckpoint:
    """A torch_dist checkpoint directory: key -> (global shape, dtype), and region reads."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        config = self.dir / "metadata.json"
        if not config.is_file():
            raise ConversionError("not a Megatron distributed checkpoint (metadata.json missing)", file=self.dir)
        backend = json.loads(config.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ConversionError(f"sharded_backend {backend!r} is not supported (torch_dist only)", file=config)
        self.reader = FileSystemReader(str(self.dir))
        try:
            self.metadata = self.reader.read_metadata()
        except Exception as err:
            raise ConversionError(f"cannot read the checkpoint metadata: {err}", file=self.dir / ".metadata") from err
        self.reader.set_up_storage_reader(self.metadata, True)
        sizes: dict[str, int] = {}
        for index, info in self.metadata.storage_data.items():
            path = self.dir / info.relative_path
            if info.relative_path not in sizes:
                if not path.is_file():
                    raise ConversionError("data file named by the metadata does not exist", file=path, tensor=index.fqn)
                sizes[info.relative_path] = path.stat().st_size
            if info.offset + info.length > sizes[info.relative_path]:
                raise ConversionError("data file is truncated: the tensor's bytes lie past its end", file=path, tensor=index.fqn)
        self._starts: dict[MetadataIndex, int | None] = {}
        self.tensors = {
            key: (tuple(md.size), md.properties.dtype)
            for key, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def files(self) -> list[Path]:
        return sorted({self.dir / info.relative_path for info in self.metadata.storage_data.values()})

    def _chunk_start(self, index: MetadataIndex, sizes: tuple[int, ...], dtype: torch.dtype) -> int | None:
        """Byte offset in its file of the first element of the stored chunk ``index`` (None: not a raw record)."""
        if index not in self._starts:
            info = self.metadata.storage_data[index]
            start = None
            if not info.transform_descriptors and sys.byteorder == "little":
                with open(self.dir / info.relative_path, "rb", buffering=0) as handle:
                    inner = record_data(FileWindow(handle, info.offset, info.length), dtype, sizes)
                start = None if inner is None else info.offset + inner
            self._starts[index] = start
        return self._starts[index]

    def locate(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[Path, int] | None:
        """(file, byte offset) where the box [offsets, offsets + sizes) of ``key`` lies as contiguous row-major bytes,
        or None when it spans several chunks or is not stored raw."""
        md = self.metadata.state_dict_metadata[key]
        chunk = next((c for c in md.chunks if all(o <= a and a + n <= o + c_n for o, c_n, a, n in
                                                   zip(c.offsets, c.sizes, offsets, sizes))), None)
        if chunk is None:
            return None
        size = tuple(chunk.sizes)
        last_partial = max((d for d in range(len(size)) if sizes[d] != size[d]), default=0)
        if any(sizes[d] != 1 for d in range(last_partial)):  # row-major: a box is contiguous only like this
            return None
        index = MetadataIndex(key, chunk.offsets)
        start = self._chunk_start(index, size, md.properties.dtype)
        if start is None:
            return None
        inner = sum((a - o) * s for a, o, s in zip(offsets, chunk.offsets, contiguous_strides(size)))
        return self.dir / self.metadata.storage_data[index].relative_path, start + inner * md.properties.dtype.itemsize

    def read_region(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The box [offsets, offsets + sizes) of the global tensor ``key``."""
        md = self.metadata.state_dict_metadata[key]
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        located = self.locate(key, offsets, sizes)
        if located is not None:
            path, start = located
            with open(path, "rb", buffering=0) as handle:
                view = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
                handle.seek(start)
                done = 0
                while done < len(view):
                    n = handle.readinto(view[done:])
                    if not n:
                        raise ConversionError("data file ends inside the tensor's bytes", file=path, tensor=key)
                    done += n
            return dest
        items = create_read_items_for_chunk_list(key, md, [ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))])
        covered = sum(math.prod(item.lengths) for item in items)
        if covered != math.prod(sizes):
            raise ConversionError(f"the checkpoint covers {covered} of the {math.prod(sizes)} elements at offset {list(offsets)}",
                                  file=self.dir / ".metadata", tensor=key)
        info = self.metadata.storage_data[items[0].storage_index]
        try:
            self.reader.read_data(LoadPlan(items), _RegionPlanner(dest)).wait()
        except Exception as err:
            raise ConversionError(f"cannot read tensor data: {err}", file=self.dir / info.relative_path, tensor=key) from err
        return dest

    def read(self, key: str, index: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor [shape] at position ``index`` of the leading axes of ``key``."""
        return self.read_region(key, index + (0,) * len(shape), (1,) * len(index) + tuple(shape)).reshape(shape)

    def chunks(self, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(offsets, sizes) of the stored chunks of ``key``."""
        return [(tuple(c.offsets), tuple(c.sizes)) for c in self.metadata.state_dict_metadata[key].chunks]
