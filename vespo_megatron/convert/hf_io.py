"""HF checkpoints on disk (what ``save_pretrained`` writes): validated headers, streamed reads, sharded writes.

Writing (:func:`write_safetensors`) takes each tensor either as a tensor or as byte ranges of other files, which are
copied by the kernel (:mod:`~vespo_megatron.convert.byte_copy`).

Reading never loads a file: :class:`HfCheckpoint` parses the safetensors headers only (names, shapes, dtypes) and
checks them against the index json and the expected tensors; :meth:`HfCheckpoint.session` opens files lazily with
``safe_open`` and closes them when the session ends (the converter opens one session per rule, so the mapped pages
of only one rule's sources are resident at a time).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import safe_open

from vespo_megatron.convert.byte_copy import PAGE, ByteRange, Sources, aligning_residue, copy_range, write_all
from vespo_megatron.convert.errors import ConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
FLOAT_DTYPES = set(SAFETENSORS_DTYPES.values())
FP8 = {"F8_E4M3": torch.float8_e4m3fn}  # block-scaled FP8 weights, read dequantized
SCALE_SUFFIX = "_scale_inv"  # ``X.weight_scale_inv`` holds the block scales of the FP8 ``X.weight``
DEQUANTIZED = torch.bfloat16


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape [ceil(R / b0), ceil(C / b1)] of the block scales of an FP8 weight [R, C]."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """bf16 [R, C] = weight [R, C] (FP8) · scale_inv[r // b0, c // b1], computed in float32."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scale).to(DEQUANTIZED)


@dataclass(frozen=True)
class TensorInfo:
    file: str  # file name inside the checkpoint directory
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype tag (F32, BF16, …)
    start: int  # byte offset of its data in the file


def _header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data, header json) of a safetensors file."""
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        return 8 + length, json.loads(handle.read(length))


def _damaged_tensor(path: Path) -> str | None:
    """The first tensor whose bytes lie past the end of a truncated safetensors file (None: header unreadable)."""
    try:
        start, header = _header(path)
        available = path.stat().st_size - start
        ends = sorted((info["data_offsets"][1], name) for name, info in header.items() if name != "__metadata__")
        return next((name for end, name in ends if end > available), None)
    except (struct.error, ValueError, KeyError, TypeError, MemoryError, OverflowError):
        return None


def _read_header(path: Path, listed: str | None = None) -> dict[str, TensorInfo]:
    """name -> TensorInfo from the header of ``path`` (validated by safetensors); ``listed`` names a tensor the index
    puts in it (for errors)."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
        start, header = _header(path)
        return {name: TensorInfo(path.name, tuple(info["shape"]), info["dtype"], start + info["data_offsets"][0])
                for name, info in header.items() if name != "__metadata__"}
    except Exception as err:  # safetensors raises its own error types for bad headers and sizes
        damaged = _damaged_tensor(path)
        what = "truncated (data past the end of the file)" if damaged else "corrupt (unreadable header)"
        raise ConversionError(f"safetensors file is {what}: {err}", file=path, tensor=damaged or listed) from err


class HfCheckpoint:
    """The tensors of an HF checkpoint directory (``model.safetensors`` or sharded with ``model.safetensors.index.json``)."""

    def __init__(self, directory: str | Path, fp8_block: tuple[int, int] = (128, 128)) -> None:
        self.dir = Path(directory)
        self.fp8_block = tuple(fp8_block)  # the config's quantization_config.weight_block_size
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
        scales = {name + SCALE_SUFFIX: name for name in expected if name in self.tensors and self.quantized(name)}
        for name, info in sorted(self.tensors.items()):
            if name not in expected and name not in ignored and name not in scales:
                raise ConversionError("unexpected tensor (not part of this model's config)", file=self.dir / info.file, tensor=name)
        for name, shape in expected.items():
            info = self.tensors.get(name)
            where = self.dir / (info.file if info else (INDEX if (self.dir / INDEX).is_file() else SINGLE))
            if info is None:
                raise ConversionError("missing tensor", file=where, tensor=name)
            if info.shape != shape:
                raise ConversionError(f"shape {list(info.shape)} does not match the config's {list(shape)}", file=where, tensor=name)
            if info.dtype in FP8:
                self._check_scale(name, where)
            elif info.dtype not in FLOAT_DTYPES:
                raise ConversionError(f"dtype {info.dtype} is not a floating-point type", file=where, tensor=name)
        return ignored

    def _check_scale(self, name: str, where: Path) -> None:
        scale, shape = self.tensors.get(name + SCALE_SUFFIX), self.tensors[name].shape
        if len(shape) != 2:
            raise ConversionError(f"FP8 tensor of {len(shape)} dims (block scales need 2)", file=where, tensor=name)
        if scale is None:
            raise ConversionError(f"FP8 tensor without its block scales {name + SCALE_SUFFIX}", file=where, tensor=name)
        want = fp8_scale_shape(shape, self.fp8_block)
        if scale.shape != want or scale.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"block scales {scale.dtype} {list(scale.shape)} do not fit {list(shape)} in "
                                  f"blocks of {list(self.fp8_block)} (want a float {list(want)})",
                                  file=self.dir / scale.file, tensor=name + SCALE_SUFFIX)

    def quantized(self, name: str) -> bool:
        """True for a block-scaled FP8 tensor (read dequantized to bf16)."""
        return self.tensors[name].dtype in FP8

    def dtype(self, name: str) -> torch.dtype:
        """The dtype the tensor is read in (bf16 for a dequantized FP8 tensor)."""
        if self.quantized(name):
            return DEQUANTIZED
        return next(dtype for dtype, tag in SAFETENSORS_DTYPES.items() if tag == self.tensors[name].dtype)

    def nbytes(self, name: str) -> int:
        return self.dtype(name).itemsize * math.prod(self.tensors[name].shape)

    def locate(self, name: str) -> tuple[Path, int]:
        """(file, byte offset) of the tensor's data."""
        info = self.tensors[name]
        return self.dir / info.file, info.start

    @contextlib.contextmanager
    def session(self) -> Iterator["HfSession"]:
        """A reader whose files are opened on first use and closed (unmapped) when the ``with`` block ends."""
        with contextlib.ExitStack() as stack:
            yield HfSession(self, stack)


class HfSession:
    def __init__(self, checkpoint: HfCheckpoint, stack: contextlib.ExitStack) -> None:
        self.ckpt, self.stack, self.handles = checkpoint, stack, {}

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (an FP8 tensor dequantized with its block scales to bf16)."""
        if self.ckpt.quantized(name):
            return dequantize_fp8(self._read(name), self._read(name + SCALE_SUFFIX), self.ckpt.fp8_block)
        return self._read(name)

    def _read(self, name: str) -> torch.Tensor:
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


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: its bytes are ``data`` (a tensor of ``dtype`` and ``shape``) or the concatenation of
    ``ranges``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    data: torch.Tensor | None = None
    ranges: tuple[ByteRange, ...] = ()

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def write_safetensors(path: Path, tensors: Sequence[OutTensor], on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Write a safetensors file: an 8-byte little-endian header length, the JSON header (``__metadata__`` format pt,
    per tensor dtype, shape and [begin, end) offsets; padded with spaces so the data starts where byte ranges copy
    fastest, see :func:`~vespo_megatron.convert.byte_copy.aligning_residue`, always on 8 bytes), then the tensors back
    to back: larger items first (each stays aligned to its item, as ``safetensors.torch.save_file`` orders them), whole
    pages before the rest (so they keep their alignment), then by name. ``on_bytes(n)`` is told each tensor's bytes
    once they are written."""
    ordered = sorted(tensors, key=lambda t: (-t.dtype.itemsize, t.nbytes % PAGE != 0, t.name))
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    pieces = []
    for t in ordered:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{t.name}: dtype {t.dtype} cannot be written")
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        for _, src, length in t.ranges:
            pieces.append((offset, src, length))
            offset += length
        offset = header[t.name]["data_offsets"][1]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((aligning_residue(pieces) - 8 - len(text)) % PAGE)
    with open(path, "wb", buffering=0) as out, Sources() as sources:
        write_all(out.fileno(), struct.pack("<Q", len(text)) + text)
        for t in ordered:
            if t.data is not None:
                if tuple(t.data.shape) != t.shape or t.data.dtype != t.dtype:
                    raise ValueError(f"{t.name}: tensor {t.data.dtype} {list(t.data.shape)} is not {t.dtype} {list(t.shape)}")
                write_all(out.fileno(), memoryview(t.data.contiguous().reshape(-1).view(torch.uint8).numpy()))
            else:
                if sum(length for _, _, length in t.ranges) != t.nbytes:
                    raise ValueError(f"{t.name}: byte ranges do not add up to {t.nbytes} bytes")
                for src, start, length in t.ranges:
                    copy_range(sources.fd(src), out.fileno(), start, length)
            on_bytes(t.nbytes)
