"""Kernel byte copies (and their fallback), the placement of copied data, and safetensors files written from byte
ranges and tensors."""
from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import safe_open

from vespo_megatron.convert import byte_copy
from vespo_megatron.convert.byte_copy import PAGE, aligning_residue, copy_range
from vespo_megatron.convert.hf_io import OutTensor, write_safetensors


@pytest.fixture(params=["kernel", "fallback"])
def copier(request, monkeypatch):
    if request.param == "fallback":
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(byte_copy.os, "copy_file_range", refuse)
    return request.param


def test_copy_range_appends_or_writes_at_an_offset(tmp_path, copier):
    src = tmp_path / "src"
    data = os.urandom(3 * PAGE + 123)
    src.write_bytes(data)
    dst = tmp_path / "dst"
    with open(src, "rb", buffering=0) as s, open(dst, "wb", buffering=0) as d:
        d.write(b"head")
        copy_range(s.fileno(), d.fileno(), 100, 2 * PAGE)  # appended at the position, which advances
        copy_range(s.fileno(), d.fileno(), 7, 50, 10 * PAGE)  # at an offset: a hole before it, position unchanged
        d.write(b"tail")
    out = dst.read_bytes()
    assert out[:4] == b"head" and out[4:4 + 2 * PAGE] == data[100:100 + 2 * PAGE]
    assert out[4 + 2 * PAGE:8 + 2 * PAGE] == b"tail"
    assert out[8 + 2 * PAGE:10 * PAGE] == bytes(10 * PAGE - 8 - 2 * PAGE)  # the hole reads as zeros
    assert out[10 * PAGE:] == data[7:57]


def test_copy_range_past_the_end_of_the_source_is_an_error(tmp_path, copier):
    src = tmp_path / "src"
    src.write_bytes(b"x" * 10)
    with open(src, "rb", buffering=0) as s, open(tmp_path / "dst", "wb", buffering=0) as d:
        with pytest.raises(OSError, match="ends 5 bytes early"):
            copy_range(s.fileno(), d.fileno(), 0, 15)


def test_aligning_residue_by_hand():
    # (offset in the data, source offset, length): residues (src - at) mod 4096 = 96 (20 bytes), 200 (15 bytes).
    assert aligning_residue([(0, 96, 10), (48, 144, 10), (0, 200, 15)]) == 96
    assert aligning_residue([(0, 96, 10), (48, 144, 10), (0, 200, 15), (8, 208, 30)]) == 200
    assert aligning_residue([(4000, 96, 1)]) == 192  # (96 - 4000) mod 4096
    assert aligning_residue([(0, 4095, 10)]) == 0  # 4095 is not a multiple of 8: nothing to align
    assert aligning_residue([(0, 4095, 10)], align=1) == 4095
    assert aligning_residue([]) == 0


def test_safetensors_from_ranges_and_tensors(tmp_path, copier):
    src = tmp_path / "src.bin"
    a = torch.arange(2 * PAGE, dtype=torch.float32).reshape(-1, 64)  # 128 rows of 256 bytes
    src.write_bytes(bytes(336) + a.numpy().tobytes())
    row = 64 * 4
    tensors = [
        # rows 0-15 and 64-79 of a, as one [32, 64] tensor
        OutTensor("w.rows", torch.float32, (32, 64), ranges=((src, 336, 16 * row), (src, 336 + 64 * row, 16 * row))),
        OutTensor("b.bias", torch.bfloat16, (3,), data=torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)),
        OutTensor("a.norm", torch.float32, (5,), data=torch.ones(5)),
    ]
    written: list[int] = []
    write_safetensors(tmp_path / "out.safetensors", tensors, written.append)
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("w.rows"), torch.cat([a[:16], a[64:80]]))
        assert torch.equal(f.get_tensor("b.bias"), tensors[1].data)
        assert torch.equal(f.get_tensor("a.norm"), torch.ones(5))
    assert sorted(written) == sorted(t.nbytes for t in tensors)
    header = int.from_bytes((tmp_path / "out.safetensors").read_bytes()[:8], "little")
    assert (8 + header) % PAGE == 336  # the copied rows sit where they sat in the source, modulo the page


def test_safetensors_writer_refuses_inconsistent_tensors(tmp_path):
    with pytest.raises(ValueError, match="do not add up"):
        write_safetensors(tmp_path / "x", [OutTensor("w", torch.float32, (4,), ranges=((tmp_path, 0, 8),))])
    with pytest.raises(ValueError, match="is not torch.float32"):
        write_safetensors(tmp_path / "y", [OutTensor("w", torch.float32, (4,), data=torch.zeros(4, dtype=torch.float64))])
    with pytest.raises(ValueError, match="cannot be written"):
        write_safetensors(tmp_path / "z", [OutTensor("w", torch.int64, (4,), data=torch.zeros(4, dtype=torch.int64))])
