"""HF -> Megatron -> HF through the CLI for every family: every tensor bitwise equal, transformers loads the result."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vespo_megatron.cli import main as cli
from vespo_megatron.convert import dcp_io
from vespo_megatron.convert.dcp_io import DcpCheckpoint
from vespo_megatron.convert.inmemory import hf_to_mcore_tensors
from vespo_megatron.convert.hf_io import HfCheckpoint
from vespo_megatron.convert.spec import model_spec
from vespo_megatron.convert.synthetic import tiny_config
from vespo_megatron.convert.verify import verify

CASES = {
    "qwen3_moe": dict(mlp_only_layers=[2]),
    "mixtral": dict(),
    "glm4_moe": dict(tie_word_embeddings=True),
}


def save_tiny(family: str, path: Path, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=250, **{**CASES[family], **overrides}))
    for module in model.modules():  # a non-zero DSV3-style expert bias
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0, 0.05)
    model.to(dtype).save_pretrained(path, max_shard_size="100KB")  # several shards and an index json
    return path


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def round_trip(src: Path, tmp: Path, *extra: str) -> tuple[Path, Path]:
    mc, back = tmp / "mcore", tmp / "hf_back"
    assert cli(["convert", "hf-to-mcore", str(src), str(mc), "--no-progress", *extra]) == 0
    assert cli(["convert", "mcore-to-hf", str(mc), str(back), "--no-progress", "--max-shard-size", "64KiB"]) == 0
    return mc, back


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


LAYOUTS = {"default": (), "per-layer": ("--per-layer-keys",),
           "te-per-layer": ("--per-layer-keys", "--transformer-impl", "transformer_engine")}
HOMOGENEOUS = {"qwen3_moe": dict(mlp_only_layers=[]), "glm4_moe": dict(first_k_dense_replace=0)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("family", sorted(CASES) + [f"{f}_homogeneous" for f in sorted(HOMOGENEOUS)])
def test_round_trip_bitwise(family, layout, tmp_path, capsys):
    """Both layouts of every family, with mixed dense/MoE layers (per-layer keys by default) and homogeneous
    (stacked [L, …] keys by default, as stock Megatron-Core asks for them)."""
    base = family.removesuffix("_homogeneous")
    src = save_tiny(base, tmp_path / "hf", **(HOMOGENEOUS[base] if base != family else {}))
    assert len(list(src.glob("*.safetensors"))) > 1
    mc, back = round_trip(src, tmp_path, *LAYOUTS[layout])
    stacked = layout == "default" and (base == "mixtral" or base != family)
    assert ("decoder.layers.mlp.router.weight" in DcpCheckpoint(mc).tensors) == stacked
    assert_bitwise(tensors(src), tensors(back))
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(src)) and len(set(index["weight_map"].values())) > 1
    assert not (mc / ".vespo-convert").exists() and not (back / ".vespo-convert").exists()
    assert AutoModelForCausalLM.from_pretrained(back).config.model_type == base
    # built-in verification: HF vs Megatron (through the mapping), HF vs HF, Megatron vs itself
    for a, b in ((src, mc), (mc, src), (src, back), (mc, mc)):
        report = verify(a, b)
        assert report.ok and report.compared > 0, report.render()
    # the in-memory path gives the same Megatron tensors as the file converter
    spec = model_spec(AutoModelForCausalLM.from_pretrained(src).config, stacked=False if LAYOUTS[layout] else None,
                      transformer_impl="transformer_engine" if layout.startswith("te") else "local")
    ckpt = DcpCheckpoint(mc)
    with HfCheckpoint(src).session() as session:
        for key, tensor in hf_to_mcore_tensors(spec, session.get):
            assert torch.equal(ckpt.read(key, (), tuple(tensor.shape)), tensor), key


def test_bf16_stacked_and_dtype_options(tmp_path, capsys):
    src = save_tiny("mixtral", tmp_path / "hf", torch.bfloat16)
    mc, back = round_trip(src, tmp_path, "--stacked-layers")  # deprecated: no effect, a warning
    assert "--stacked-layers is deprecated" in capsys.readouterr().err
    assert_bitwise(tensors(src), tensors(back))
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight" in DcpCheckpoint(mc).tensors
    f32 = tmp_path / "hf_f32"
    assert cli(["convert", "mcore-to-hf", str(mc), str(f32), "--no-progress", "--dtype", "float32"]) == 0
    out = tensors(f32)
    assert all(t.dtype == torch.float32 for t in out.values())
    assert all(torch.equal(out[n], t.float()) for n, t in tensors(src).items())
    assert AutoModelForCausalLM.from_pretrained(f32).config.dtype == torch.float32


def test_tied_lm_head_can_be_emitted(tmp_path):
    src = save_tiny("glm4_moe", tmp_path / "hf")
    mc, _ = round_trip(src, tmp_path)
    out = tmp_path / "emitted"
    assert cli(["convert", "mcore-to-hf", str(mc), str(out), "--no-progress", "--emit-tied-lm-head"]) == 0
    written = tensors(out)
    assert torch.equal(written["lm_head.weight"], written["model.embed_tokens.weight"])


def test_verify_reports_a_changed_tensor(tmp_path, capsys):
    src = save_tiny("qwen3_moe", tmp_path / "hf")
    _, back = round_trip(src, tmp_path)
    shard = sorted(back.glob("*.safetensors"))[3]
    changed = load_file(shard)
    name = sorted(changed)[0]
    changed[name] = changed[name].clone()
    changed[name].view(-1)[0] += 1
    from safetensors.torch import save_file

    save_file(changed, shard, metadata={"format": "pt"})
    assert cli(["convert", "verify", str(src), str(back), "--no-progress"]) == 1
    assert f"1 differ: {name}" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    src = save_tiny("qwen3_moe", tmp_path / "hf")
    dest = tmp_path / "plan_only"
    assert cli(["convert", "hf-to-mcore", str(src), str(dest), "--dry-run", "--tp", "2", "--ep", "2"]) == 0
    out = capsys.readouterr().out
    assert not dest.exists()
    assert "6 data files" in out and "__0_5.distcp" in out and "layer 3" in out and "peak memory estimate" in out
    assert "vocab 250 -> 256" in out


def test_kernel_copies_equal_the_in_memory_path(tmp_path, monkeypatch):
    """Both directions copy unchanged bytes file to file; forcing every tensor through memory changes nothing."""
    src = save_tiny("glm4_moe", tmp_path / "hf", torch.bfloat16)  # tied, padded vocabulary (a hole of zeros), bf16
    (tmp_path / "raw").mkdir()
    mc, back = round_trip(src, tmp_path / "raw")
    ckpt = DcpCheckpoint(mc)
    key = next(k for k in ckpt.tensors if "experts.experts.linear_fc1" in k)
    shape = ckpt.tensors[key][0]
    assert ckpt.locate(key, (0,) * len(shape), shape) is None  # all experts: one chunk each, not one run of bytes
    assert ckpt.locate(key, (1, 0, 0), (1, *shape[1:])) is not None
    whole = ckpt.read_region(key, (0,) * len(shape), shape)  # through DCP's reader
    assert torch.equal(whole[1:2], ckpt.read_region(key, (1, 0, 0), (1, *shape[1:])))

    monkeypatch.setattr(dcp_io, "RAW_WRITES", False)
    monkeypatch.setattr(DcpCheckpoint, "locate", lambda self, key, offsets, sizes: None)
    (tmp_path / "memory").mkdir()
    mc_memory, back_memory = round_trip(src, tmp_path / "memory")
    report = verify(mc, mc_memory)
    assert report.ok and report.compared == sum(len(ckpt.chunks(k)) for k in ckpt.tensors), report.render()
    assert_bitwise(tensors(back), tensors(back_memory))
    assert_bitwise(tensors(src), tensors(back))
