"""Block-scaled FP8 (e4m3) HF checkpoints: hf-to-mcore dequantizes them (bf16, or --dtype) while streaming; checked
against a block-by-block reference computed here, with partial blocks at the edges; clear errors for bad scales."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vespo_megatron.cli import main as cli
from vespo_megatron.convert.errors import ConversionError
from vespo_megatron.convert.hf_to_mcore import HfToMcoreOptions, convert_hf_to_mcore

from tests.e2e.test_convert_roundtrip import save_tiny, tensors

BLOCK = (24, 16)  # rows 64 / 32 / 128 leave partial blocks of 16 / 8 / 8 rows


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale_inv [ceil(R/24), ceil(C/16)]) with scale = block amax / 448."""
    rows, cols = w.shape
    scales = torch.empty(-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            part = w[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]].float()
            scales[i, j] = part.abs().max().clamp(min=1e-8) / 448
            q[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]] = (part / scales[i, j]).to(q.dtype)
    return q, scales


def reference(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            rows, cols = slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1])
            out[rows, cols] = (q[rows, cols].float() * scales[i, j]).to(torch.bfloat16)
    return out


def fp8_checkpoint(tmp: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Qwen3-MoE whose projection weights are FP8 with block scales (norms, router, embeddings bf16), and the
    dequantized reference of every tensor."""
    src = save_tiny("qwen3_moe", tmp / "bf16", torch.bfloat16)
    out, expected = {}, {}
    for name, t in tensors(src).items():
        if name.endswith("proj.weight"):
            out[name], out[name + "_scale_inv"] = quantize(t)
            expected[name] = reference(out[name], out[name + "_scale_inv"])
        else:
            out[name] = expected[name] = t
    fp8 = tmp / "fp8"
    fp8.mkdir()
    save_file(out, fp8 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (fp8 / "config.json").write_text(json.dumps(config))
    return fp8, expected


def test_fp8_dequantized_against_a_blockwise_reference(tmp_path, capsys):
    src, expected = fp8_checkpoint(tmp_path)
    assert cli(["convert", "hf-to-mcore", str(src), str(tmp_path / "plan"), "--dry-run"]) == 0
    assert "tensors from block-scaled FP8 sources, dequantized to bfloat16" in capsys.readouterr().out
    mc, back = tmp_path / "mcore", tmp_path / "back"
    assert cli(["convert", "hf-to-mcore", str(src), str(mc), "--no-progress"]) == 0
    assert cli(["convert", "mcore-to-hf", str(mc), str(back), "--no-progress"]) == 0
    got = tensors(back)
    assert got.keys() == expected.keys() and any(n.endswith("experts.7.down_proj.weight") for n in got)
    for name, value in expected.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], value), name
    f32 = tmp_path / "f32"
    assert cli(["convert", "hf-to-mcore", str(src), str(f32), "--dtype", "float32", "--no-progress"]) == 0
    name = "model.layers.1.self_attn.q_proj.weight"
    back32 = tmp_path / "back32"
    assert cli(["convert", "mcore-to-hf", str(f32), str(back32), "--no-progress"]) == 0
    assert tensors(back32)[name].dtype == torch.float32 and torch.equal(tensors(back32)[name], expected[name].float())


def test_fp8_without_or_with_misshapen_scales_fails_clearly(tmp_path):
    src, _ = fp8_checkpoint(tmp_path)
    data = tensors(src)
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    for change, match in ((lambda d: d.pop(name + "_scale_inv"), "FP8 tensor without its block scales"),
                          (lambda d: d.update({name + "_scale_inv": torch.ones(1, 1)}), r"do not fit \[32, 64\]")):
        bad = {k: v.clone() for k, v in data.items()}
        change(bad)
        save_file(bad, src / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ConversionError, match=match) as err:
            convert_hf_to_mcore(src, tmp_path / f"out{len(bad)}", HfToMcoreOptions(progress=False))
        assert name in err.value.tensor
