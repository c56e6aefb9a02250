"""The converted checkpoint against Megatron-Core itself (1 rank): same keys and shapes as the model's
sharded_state_dict, loads with megatron's own loader, gives the HF model's logits; a checkpoint *saved by Megatron*
converts back to the HF tensors bitwise."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from transformers import AutoModelForCausalLM

from vespo_megatron.cli import main as cli
from vespo_megatron.convert import mapping
from vespo_megatron.convert.mcore_to_hf import McoreToHfOptions, convert_mcore_to_hf
from vespo_megatron.convert.parity import build_megatron, hf_logits, logits_parity, megatron_logits
from vespo_megatron.convert.spec import model_spec
from vespo_megatron.megatron.parallel import init_parallel
from vespo_megatron.megatron.weights import local_shards

from tests.e2e.test_convert_roundtrip import CASES, assert_bitwise, save_tiny, tensors

ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    init_parallel()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    out = {}
    for family in CASES:
        root = tmp_path_factory.mktemp(family)
        src = save_tiny(family, root / "hf")
        assert cli(["convert", "hf-to-mcore", str(src), str(root / "mcore"), "--no-progress"]) == 0
        out[family] = (src, root / "mcore")
    return out


def objects(sharded) -> list[ShardedObject]:
    stack, found = [sharded], []
    while stack:
        node = stack.pop()
        for value in node.values() if isinstance(node, dict) else node:
            if isinstance(value, ShardedObject):
                found.append(value)
            elif isinstance(value, (dict, list, tuple)):
                stack.append(value)
    return found


@pytest.mark.parametrize("family", sorted(CASES))
def test_keys_and_shapes_equal_the_models(family, converted):
    src, _ = converted[family]
    config = AutoModelForCausalLM.from_pretrained(src).config
    model = build_megatron(config)
    spec = model_spec(config)
    shards = list(local_shards(model))
    assert {s.key: tuple(s.global_shape) for s in shards} == mapping.global_shapes(spec)
    ours = {mapping.extra_state_key(r) for r in mapping.rules(spec)} - {None}
    assert {o.unique_key for o in objects(model.sharded_state_dict())} == ours


@pytest.mark.parametrize("family", sorted(CASES))
def test_megatron_loads_the_checkpoint_and_matches_hf_logits(family, converted, tmp_path):
    src, mc = converted[family]
    model = build_megatron(AutoModelForCausalLM.from_pretrained(src).config).eval()
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(mc))  # megatron's default (strict) loading
    result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
    tokens = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = megatron_logits(model, tokens)[..., :250]
    ref = hf_logits(src, tokens)
    assert (ours - ref).abs().max().item() < ATOL
    # a checkpoint written by Megatron itself (its own chunking) converts back to the HF tensors
    saved = tmp_path / "megatron_saved"
    saved.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(saved))
    convert_mcore_to_hf(saved, tmp_path / "back", McoreToHfOptions(hf_config=src, progress=False))
    assert_bitwise(tensors(src), tensors(tmp_path / "back"))


def test_logits_parity_check_and_cli(converted, capsys):
    src, mc = converted["glm4_moe"]
    result = logits_parity(src, mc)
    assert result["max_abs_diff"] < ATOL < result["max_abs_logit"]
    assert logits_parity(src)["max_abs_diff"] < ATOL  # the same mapping, in memory
    assert cli(["convert", "verify", str(mc), str(src), "--logits", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bitwise equal" in out and "max_abs_diff" in out
    assert cli(["convert", "verify", str(src), str(src), "--logits", "--no-progress"]) == 2
    assert "needs one HF and one Megatron checkpoint" in capsys.readouterr().err


def test_stacked_keys_load_into_a_homogeneous_megatron_model(converted, tmp_path):
    """Megatron stacks the layers of a homogeneous model (moe_layer_freq=1) on a leading axis of each key."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from vespo_megatron.megatron.model import transformer_config

    src, per_layer = converted["mixtral"]
    stacked = tmp_path / "stacked"
    assert cli(["convert", "hf-to-mcore", str(src), str(stacked), "--stacked-layers", "--no-progress"]) == 0
    config = AutoModelForCausalLM.from_pretrained(src).config
    model = GPTModel(transformer_config(config, moe_layer_freq=1),
                     get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False, normalization="RMSNorm"),
                     vocab_size=256, max_sequence_length=512, position_embedding_type="rope")
    spec = model_spec(config, stacked=True)
    assert {s.key: tuple(s.global_shape) for s in local_shards(model)} == mapping.global_shapes(spec)
    ours = {mapping.extra_state_key(r) for r in mapping.rules(spec)} - {None}
    assert {o.unique_key for o in objects(model.sharded_state_dict())} == ours
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(stacked)), strict=False)
    reference = build_megatron(config)
    reference.load_state_dict(dist_checkpointing.load(reference.sharded_state_dict(), str(per_layer)), strict=False)
    expected = {k: v for k, v in reference.state_dict().items() if not k.endswith("_extra_state")}
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
