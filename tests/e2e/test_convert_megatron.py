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


STOCK = {"mixtral": {}, "qwen3_moe": dict(mlp_only_layers=[]), "glm4_moe": dict(first_k_dense_replace=0),
         "qwen3_moe_mixed": dict(mlp_only_layers=[2]), "glm4_moe_mixed": {}}


def stock_gpt_model(hf_config, moe_layer_freq):
    """A GPTModel built the way Megatron-LM's pretrain_gpt builds an MoE model: ``get_gpt_decoder_block_spec`` with
    the local spec and ``--moe-layer-freq`` as users pass it (an integer, or a list for mixed dense/MoE layers)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from vespo_megatron.convert.parity import megatron_build_args
    from vespo_megatron.hf_config import padded_vocab, rope_theta
    from vespo_megatron.megatron.model import transformer_config

    twin, overrides = megatron_build_args(hf_config)
    config = transformer_config(twin, **{**overrides, "moe_layer_freq": moe_layer_freq})
    return GPTModel(config, get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm"),
                    vocab_size=padded_vocab(hf_config.vocab_size), max_sequence_length=hf_config.max_position_embeddings,
                    share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
                    position_embedding_type="rope", rotary_base=rope_theta(hf_config))


@pytest.mark.parametrize("family", sorted(STOCK))
def test_default_output_loads_strictly_into_a_stock_megatron_model(family, tmp_path):
    """The DEFAULT hf-to-mcore output into a stock GPTModel (integer moe_layer_freq where all layers are MoE, the
    local spec), strict loading on both levels; every parameter equals the HF tensors it came from."""
    from megatron.core.dist_checkpointing.validation import StrictHandling

    base = family.removesuffix("_mixed")
    src = save_tiny(base, tmp_path / "hf", **STOCK[family])
    mc = tmp_path / "mcore"
    assert cli(["convert", "hf-to-mcore", str(src), str(mc), "--no-progress"]) == 0
    config = AutoModelForCausalLM.from_pretrained(src).config
    spec = model_spec(config)
    mixed = len(set(spec.moe_layers)) > 1
    assert mixed == family.endswith("_mixed") and spec.stacked == (not mixed)
    model = stock_gpt_model(config, [int(f) for f in spec.moe_layers] if mixed else 1)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(mc), strict=StrictHandling.RAISE_ALL)
    result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys and all(k.endswith("._extra_state") for k in result.missing_keys)
    hf = tensors(src)
    by_name = {}
    for rule in mapping.rules(spec):
        name = rule.module.format(layer=rule.layer, expert=rule.expert)
        by_name[name] = mapping.to_mcore(spec, rule, [hf[n] for n in rule.hf])
    params = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    assert params.keys() == by_name.keys()
    for name, value in params.items():
        assert value.dtype == by_name[name].dtype and torch.equal(value, by_name[name]), name
    used = {n for rule in mapping.rules(spec) for n in rule.hf}
    assert used == set(hf)  # every HF tensor went into a parameter
