"""Megatron-Core ``torch_dist`` checkpoints, written and read one region at a time.

Format (what ``megatron.core.dist_checkpointing.save`` writes): ``metadata.json`` (backend ``torch_dist``),
``common.pt`` (non-tensor state), ``.metadata`` (a pickled torch.distributed.checkpoint ``Metadata``: per key the
global shape, dtype and chunk list, and per chunk the file, byte offset and length) and ``*.distcp`` data files in
which every chunk is one ``torch.save`` record (DCP's TORCH_SAVE serialization). A chunk at leading-axis position
``index`` of a key with global shape ``axes + shape`` is stored as a tensor [1]·len(index) + shape.

The writer emits one data file per conversion unit plus that file's piece of the metadata; :func:`finish` merges
the pieces. The reader reads any region through DCP's own ``FileSystemReader`` (which reshards from whatever chunks
the checkpoint has, e.g. one written by Megatron under TP/EP), so memory stays at the region read.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
from pathlib import Path
from typing import Iterable, Iterator

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

from vespo_megatron.convert.errors import ConversionError

BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}
# One written record: key, byte offset in the file, byte length, and for a tensor chunk (else None) its global shape,
# chunk offset, dtype and chunk sizes.
Piece = tuple[str, int, int, tuple | None]


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes (``torch.save`` writes the whole storage of a view)."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.contiguous().clone()


@contextlib.contextmanager
def _no_zip_crc() -> Iterator[None]:
    """torch.save without the zip CRC32 (half of the write time; ``torch.load`` does not check it)."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


class _FileWindow(io.RawIOBase):
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


def write_data_file(path: Path, chunks: Iterable[tuple[str, tuple[int, ...], tuple[int, ...], int, torch.Tensor]],
                    objects: Iterable[str] = ()) -> list[Piece]:
    """Write tensor chunks (key, global shape, offset, number of leading axes, tensor), then the empty ``[None]``
    objects (Megatron's ``_extra_state`` of linear layers without Transformer Engine) to ``path``; return the pieces."""
    pieces: list[Piece] = []
    with open(path, "wb") as handle, _no_zip_crc():
        for key, global_shape, offset, lead, tensor in chunks:
            tensor = _compact(tensor.reshape((1,) * lead + tuple(tensor.shape)))
            start = handle.tell()
            torch.save(tensor, handle)
            pieces.append((key, start, handle.tell() - start, (global_shape, offset, tensor.dtype, tuple(tensor.shape))))
        for key in objects:
            start = handle.tell()
            torch.save([None], handle)
            pieces.append((key, start, handle.tell() - start, None))
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
        self.tensors = {
            key: (tuple(md.size), md.properties.dtype)
            for key, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def files(self) -> list[Path]:
        return sorted({self.dir / info.relative_path for info in self.metadata.storage_data.values()})

    def read_region(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The box [offsets, offsets + sizes) of the global tensor ``key``."""
        md = self.metadata.state_dict_metadata[key]
        items = create_read_items_for_chunk_list(key, md, [ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))])
        covered = sum(math.prod(item.lengths) for item in items)
        if covered != math.prod(sizes):
            raise ConversionError(f"the checkpoint covers {covered} of the {math.prod(sizes)} elements at offset {list(offsets)}",
                                  file=self.dir / ".metadata", tensor=key)
        info = self.metadata.storage_data[items[0].storage_index]
        try:
            if len(items) == 1 and not info.transform_descriptors:  # one stored chunk holds the region: load it directly
                with open(self.dir / info.relative_path, "rb", buffering=0) as handle:
                    chunk = torch.load(_FileWindow(handle, info.offset, info.length), map_location="cpu", weights_only=True)
                region = chunk
                for dim, (start, length) in enumerate(zip(items[0].storage_offsets, items[0].lengths)):
                    region = region.narrow(dim, start, length)
                return region if region.shape == chunk.shape else region.clone()
            dest = torch.empty(sizes, dtype=md.properties.dtype)
            self.reader.read_data(LoadPlan(items), _RegionPlanner(dest)).wait()
            return dest
        except Exception as err:
            raise ConversionError(f"cannot read tensor data: {err}", file=self.dir / info.relative_path, tensor=key) from err

    def read(self, key: str, index: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor [shape] at position ``index`` of the leading axes of ``key``."""
        return self.read_region(key, index + (0,) * len(shape), (1,) * len(index) + tuple(shape)).reshape(shape)

    def chunks(self, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(offsets, sizes) of the stored chunks of ``key``."""
        return [(tuple(c.offsets), tuple(c.sizes)) for c in self.metadata.state_dict_metadata[key].chunks]
