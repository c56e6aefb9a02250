"""HF checkpoints on disk (what ``save_pretrained`` writes): validated headers, streamed reads, sharded writes.

Reading never loads a file: :class:`HfCheckpoint` parses the safetensors headers only (names, shapes, dtypes) and
checks them against the index json and the expected tensors; :meth:`HfCheckpoint.session` opens files lazily with
``safe_open`` and closes them when the session ends (the converter opens one session per rule, so the mapped pages
of only one rule's sources are resident at a time).
"""
from __future__ import annotations

import contextlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from vespo_megatron.convert.errors import ConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    file: str  # file name inside the checkpoint directory
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype tag (F32, BF16, …)


def _damaged_tensor(path: Path) -> str | None:
    """The first tensor whose bytes lie past the end of a truncated safetensors file (None: header unreadable)."""
    try:
        with open(path, "rb") as handle:
            length = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(length))
        available = path.stat().st_size - 8 - length
        ends = sorted((info["data_offsets"][1], name) for name, info in header.items() if name != "__metadata__")
        return next((name for end, name in ends if end > available), None)
    except (struct.error, ValueError, KeyError, TypeError, MemoryError, OverflowError):
        return None


def _read_header(path: Path, listed: str | None = None) -> dict[str, TensorInfo]:
    """name -> TensorInfo from the header of ``path``; ``listed`` names a tensor the index puts in it (for errors)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {
                name: TensorInfo(path.name, tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                for name in handle.keys()
            }
    except Exception as err:  # safetensors raises its own error types for bad headers and sizes
        damaged = _damaged_tensor(path)
        what = "truncated (data past the end of the file)" if damaged else "corrupt (unreadable header)"
        raise ConversionError(f"safetensors file is {what}: {err}", file=path, tensor=damaged or listed) from err


class HfCheckpoint:
    """The tensors of an HF checkpoint directory (``model.safetensors`` or sharded with ``model.safetensors.index.json``)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConversionError("HF checkpoint directory not found", file=self.dir)
        index = self.dir / INDEX
        self.tensors: dict[str, TensorInfo] = {}
        if index.is_file():
            self._read_index(index)
        elif (self.dir / SINGLE).is_file():
            self.tensors = _read_header(self.dir / SINGLE)
            self.files = [SINGLE]
        else:
            raise ConversionError(f"neither {INDEX} nor {SINGLE} found", file=self.dir)

    def _read_index(self, index: Path) -> None:
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConversionError(f"not a valid index json ({err!r})", file=index) from err
        self.files = sorted(set(weight_map.values()))
        for name in self.files:
            if not (self.dir / name).is_file():
                first = next(t for t, f in weight_map.items() if f == name)
                raise ConversionError(f"the index names file {name!r}, which does not exist", file=index, tensor=first)
        first = {file: tensor for tensor, file in reversed(list(weight_map.items()))}
        headers = {name: _read_header(self.dir / name, first[name]) for name in self.files}
        for tensor, file in weight_map.items():
            if tensor not in headers[file]:
                raise ConversionError(f"listed in {INDEX} but not present in the file", file=self.dir / file, tensor=tensor)
            self.tensors[tensor] = headers[file][tensor]
        for file, header in headers.items():
            for tensor in header:
                if weight_map.get(tensor) != file:
                    raise ConversionError(f"present in the file but not listed for it in {INDEX}", file=self.dir / file, tensor=tensor)

    def check(self, expected: dict[str, tuple[int, ...]], ignore: str | None = None) -> list[str]:
        """Raise on a missing, unexpected, non-float or wrongly shaped tensor; return the ignored names (regex)."""
        pattern = re.compile(ignore) if ignore else None
        ignored = sorted(name for name in self.tensors if name not in expected and pattern and pattern.fullmatch(name))
        for name, info in sorted(self.tensors.items()):
            if name not in expected and name not in ignored:
                raise ConversionError("unexpected tensor (not part of this model's config)", file=self.dir / info.file, tensor=name)
        for name, shape in expected.items():
            info = self.tensors.get(name)
            where = self.dir / (info.file if info else (INDEX if (self.dir / INDEX).is_file() else SINGLE))
            if info is None:
                raise ConversionError("missing tensor", file=where, tensor=name)
            if info.shape != shape:
                raise ConversionError(f"shape {list(info.shape)} does not match the config's {list(shape)}", file=where, tensor=name)
            if info.dtype not in FLOAT_DTYPES:
                raise ConversionError(f"dtype {info.dtype} is not a floating-point type", file=where, tensor=name)
        return ignored

    def nbytes(self, name: str) -> int:
        info = self.tensors[name]
        n = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[info.dtype]
        for size in info.shape:
            n *= size
        return n

    @contextlib.contextmanager
    def session(self) -> Iterator["HfSession"]:
        """A reader whose files are opened on first use and closed (unmapped) when the ``with`` block ends."""
        with contextlib.ExitStack() as stack:
            yield HfSession(self, stack)


class HfSession:
    def __init__(self, checkpoint: HfCheckpoint, stack: contextlib.ExitStack) -> None:
        self.ckpt, self.stack, self.handles = checkpoint, stack, {}

    def get(self, name: str) -> torch.Tensor:
        info = self.ckpt.tensors[name]
        if info.file not in self.handles:
            self.handles[info.file] = self.stack.enter_context(safe_open(str(self.ckpt.dir / info.file), framework="pt"))
        try:
            return self.handles[info.file].get_tensor(name)
        except Exception as err:
            raise ConversionError(f"cannot read tensor data: {err}", file=self.ckpt.dir / info.file, tensor=name) from err


def shard_name(k: int, count: int) -> str:
    """HF shard file name ``model-0000k-of-0000n.safetensors`` (1-based k)."""
    return f"model-{k:05d}-of-{count:05d}.safetensors"


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    """The ``model.safetensors.index.json`` text (keys sorted so identical inputs give identical bytes)."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
