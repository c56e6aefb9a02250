"""Every bad input gives a ConversionError naming the file (and the tensor where there is one) and writes nothing."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vespo_megatron.cli import main as cli
from vespo_megatron.convert.errors import ConversionError
from vespo_megatron.convert.hf_to_mcore import HfToMcoreOptions, convert_hf_to_mcore
from vespo_megatron.convert.mcore_to_hf import McoreToHfOptions, convert_mcore_to_hf
from vespo_megatron.convert.spec import Layout
from vespo_megatron.convert.synthetic import tiny_config, write_synthetic

INDEX = "model.safetensors.index.json"
QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("good")
    write_synthetic(root / "hf", tiny_config("qwen3_moe", num_hidden_layers=2))
    # per-layer keys: the errors below name a layer (the default layout of this homogeneous model is stacked)
    convert_hf_to_mcore(root / "hf", root / "mcore", HfToMcoreOptions(per_layer_keys=True, **QUIET))
    return root / "hf", root / "mcore"


@pytest.fixture
def hf(good, tmp_path) -> Path:
    return Path(shutil.copytree(good[0], tmp_path / "hf"))


@pytest.fixture
def mcore(good, tmp_path) -> Path:
    return Path(shutil.copytree(good[1], tmp_path / "mcore"))


def shard_of(hf: Path, tensor: str) -> Path:
    return hf / json.loads((hf / INDEX).read_text())["weight_map"][tensor]


def rewrite(hf: Path, tensor: str, value: torch.Tensor | None, new_name: str | None = None) -> Path:
    """Replace (or drop with None, or add as new_name) a tensor in its shard and keep the index consistent."""
    shard = shard_of(hf, tensor)
    tensors = load_file(shard)
    index = json.loads((hf / INDEX).read_text())
    if new_name:
        tensors[new_name] = value
        index["weight_map"][new_name] = shard.name
    elif value is None:
        del tensors[tensor], index["weight_map"][tensor]
    else:
        tensors[tensor] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    (hf / INDEX).write_text(json.dumps(index))
    return shard


def hf_fails(hf: Path, tmp_path: Path, match: str, file: Path, tensor: str | None, layout: Layout = Layout()) -> None:
    dest = tmp_path / "out"
    with pytest.raises(ConversionError, match=match) as err:
        convert_hf_to_mcore(hf, dest, HfToMcoreOptions(layout=layout, **QUIET))
    assert err.value.file == str(file) and err.value.tensor == tensor
    assert str(file) in str(err.value) and (tensor is None or repr(tensor) in str(err.value))
    assert not dest.exists()


Q = "model.layers.1.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.experts.3.up_proj.weight"


def test_missing_tensor(hf, tmp_path):
    rewrite(hf, UP, None)
    hf_fails(hf, tmp_path, "missing tensor", hf / INDEX, UP)


def test_unexpected_tensor(hf, tmp_path):
    shard = rewrite(hf, Q, torch.zeros(2), new_name="model.layers.0.mlp.experts.8.up_proj.weight")
    hf_fails(hf, tmp_path, "unexpected tensor", shard, "model.layers.0.mlp.experts.8.up_proj.weight")


def test_unexpected_tensor_can_be_ignored(hf, tmp_path):
    rewrite(hf, Q, torch.zeros(2), new_name="model.layers.2.eh_proj.weight")  # e.g. an MTP layer
    plan = convert_hf_to_mcore(hf, tmp_path / "out", HfToMcoreOptions(ignore=r"model\.layers\.2\..*", dry_run=True, **QUIET))
    assert "ignored 1 source tensors" in plan.render()


def test_wrong_shape(hf, tmp_path):
    shard = rewrite(hf, Q, torch.zeros(64, 60))
    hf_fails(hf, tmp_path, r"shape \[64, 60\] does not match the config's \[64, 64\]", shard, Q)


def test_truncated_file(hf, tmp_path):
    shard = shard_of(hf, UP)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    last = max(load_file_header(data).items(), key=lambda kv: kv[1]["data_offsets"][1])[0]
    hf_fails(hf, tmp_path, "truncated", shard, last)


def load_file_header(data: bytes) -> dict:
    length = int.from_bytes(data[:8], "little")
    return {k: v for k, v in json.loads(data[8 : 8 + length]).items() if k != "__metadata__"}


def test_corrupt_header(hf, tmp_path):
    shard = shard_of(hf, UP)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32
    shard.write_bytes(bytes(data))
    first = next(t for t, f in json.loads((hf / INDEX).read_text())["weight_map"].items() if f == shard.name)
    hf_fails(hf, tmp_path, "corrupt", shard, first)


def test_index_names_a_missing_file(hf, tmp_path):
    shard = shard_of(hf, UP)
    shard.unlink()
    first = next(t for t, f in json.loads((hf / INDEX).read_text())["weight_map"].items() if f == shard.name)
    hf_fails(hf, tmp_path, f"names file '{shard.name}', which does not exist", hf / INDEX, first)


def test_config_disagrees_with_weights(hf, tmp_path):
    config = json.loads((hf / "config.json").read_text())
    config["moe_intermediate_size"] = 48
    (hf / "config.json").write_text(json.dumps(config))
    gate = "model.layers.0.mlp.experts.0.gate_proj.weight"
    hf_fails(hf, tmp_path, r"shape \[32, 64\] does not match the config's \[48, 64\]", shard_of(hf, gate), gate)


@pytest.mark.parametrize("model_type,match", [("llama", "unsupported architecture model_type='llama'"),
                                              ("gpt2", "unsupported architecture model_type='gpt2'")])
def test_unsupported_architecture(hf, tmp_path, model_type, match):
    config = json.loads((hf / "config.json").read_text())
    config["model_type"] = model_type
    (hf / "config.json").write_text(json.dumps(config))
    hf_fails(hf, tmp_path, match, hf / "config.json", None)


@pytest.mark.parametrize("layout,match", [(Layout(tp=3), "tp=3 does not divide num_attention_heads=4"),
                                          (Layout(tp=4), r"tp=4 does not divide num_key_value_heads \(kv groups\)=2"),
                                          (Layout(ep=3), "ep=3 does not divide num experts=8")])
def test_layout_does_not_divide(hf, tmp_path, layout, match):
    hf_fails(hf, tmp_path, match, hf / "config.json", None, layout)


def test_output_directory_not_empty(hf, tmp_path, capsys):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("user data")
    assert cli(["convert", "hf-to-mcore", str(hf), str(dest), "--no-progress"]) == 2
    assert f"{dest}: output directory is not empty" in capsys.readouterr().err
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def mcore_fails(mcore: Path, hf_config: Path, tmp_path: Path, match: str, file: Path, tensor: str | None) -> None:
    dest = tmp_path / "back"
    with pytest.raises(ConversionError, match=match) as err:
        convert_mcore_to_hf(mcore, dest, McoreToHfOptions(hf_config=hf_config, **QUIET))
    assert err.value.file == str(file) and err.value.tensor == tensor
    assert not dest.exists()


def edit_metadata(mcore: Path, edit) -> None:
    metadata = pickle.loads((mcore / ".metadata").read_bytes())
    edit(metadata)
    (mcore / ".metadata").write_bytes(pickle.dumps(metadata))


def test_megatron_missing_and_unexpected_key(mcore, hf, tmp_path):
    key = "decoder.layers.1.mlp.router.weight"
    edit_metadata(mcore, lambda md: md.state_dict_metadata.pop(key))
    mcore_fails(mcore, hf, tmp_path, "missing tensor", mcore / ".metadata", key)
    edit_metadata(mcore, lambda md: md.state_dict_metadata.update({key: md.state_dict_metadata["decoder.layers.0.mlp.router.weight"],
                                                                  "decoder.layers.7.mlp.router.weight": md.state_dict_metadata["decoder.layers.0.mlp.router.weight"]}))
    mcore_fails(mcore, hf, tmp_path, "unexpected tensor", mcore / ".metadata", "decoder.layers.7.mlp.router.weight")


def test_megatron_truncated_data_file_and_wrong_config(mcore, hf, tmp_path):
    config = json.loads((hf / "config.json").read_text())
    config["hidden_size"] = 32
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(config))
    mcore_fails(mcore, tmp_path / "cfg", tmp_path, "global shape", mcore / ".metadata", "embedding.word_embeddings.weight")
    data = mcore / "__0_2.distcp"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(ConversionError, match="truncated") as err:
        convert_mcore_to_hf(mcore, tmp_path / "back", McoreToHfOptions(hf_config=hf, **QUIET))
    assert err.value.file == str(data) and err.value.tensor.startswith("decoder.layers.1.")
