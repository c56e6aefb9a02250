"""The converted checkpoint against Megatron-Core itself (1 rank): same keys and shapes as the model's
sharded_state_dict, loads with megatron's own loader, gives the HF model's logits; a checkpoint *saved by Megatron*
converts back to the HF tensors bitwise."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from transformers import AutoModelForCausalLM

from vespo_megatron.cli import main as cli
from vespo_megatron.convert import mapping
from vespo_megatron.convert.mcore_to_hf import McoreToHfOptions, convert_mcore_to_hf
from vespo_megatron.convert.parity import build_megatron, hf_logits, logits_parity, megatron_logits
from vespo_megatron.convert.spec import model_spec
from vespo_megatron.megatron import compat
from vespo_megatron.megatron.layer_keys import StandInTEProvider
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


class _NormLinear(ColumnParallelLinear):
    """Local twin of Transformer Engine's layer-norm column-parallel linear: its parameters ``weight`` and
    ``layer_norm_weight`` (replicated), as TE names them."""

    def __init__(self, input_size, output_size, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.zeros(input_size))


class _LocalTwinTEProvider(StandInTEProvider):
    """megatron-core's TE layer spec realised with local modules of the same parameter names (no TE needed)."""

    def column_parallel_linear(self):
        return ColumnParallelLinear

    def row_parallel_linear(self):
        return RowParallelLinear

    def column_parallel_layer_norm_linear(self):
        return _NormLinear

    def layer_norm(self, rms_norm=False, for_qk=False, has_residual=False):
        return WrappedTorchNorm

    def core_attention(self):
        return DotProductAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm, moe_use_legacy_grouped_gemm=None):
        """0.16 asks with two flags for (module, submodules); 0.17+ with one flag for an experts builder."""
        submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        if moe_use_legacy_grouped_gemm is not None:
            return SequentialMLP, submodules
        return partial(SequentialMLP, submodules=submodules)


def te_twin_model(hf_config):
    """A GPTModel whose layers are megatron-core's Transformer Engine layer spec (structure and key maps), built
    from local modules with TE's parameter names; per-layer keys where dense and MoE layers are mixed."""
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from vespo_megatron.convert.parity import megatron_build_args
    from vespo_megatron.hf_config import moe_layers, padded_vocab, rope_theta
    from vespo_megatron.megatron.model import transformer_config

    twin, overrides = megatron_build_args(hf_config)
    pattern = [int(f) for f in moe_layers(hf_config)]
    config = transformer_config(twin, **{**overrides, "moe_layer_freq": 1 if all(pattern) else pattern})
    if gpt_layer_specs.HAVE_TE:
        pytest.skip("Transformer Engine is installed: test_te_model_asks_for_the_te_key_set checks the real TE model")
    with compat.te_spec_provider(_LocalTwinTEProvider):
        layer = {moe: gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts if moe else None, qk_layernorm=config.qk_layernorm) for moe in (0, 1)}
    block = TransformerBlockSubmodules(layer_specs=[layer[f] for f in pattern], layer_norm=WrappedTorchNorm)
    return GPTModel(config, block, vocab_size=padded_vocab(hf_config.vocab_size),
                    max_sequence_length=hf_config.max_position_embeddings,
                    share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
                    position_embedding_type="rope", rotary_base=rope_theta(hf_config))


@pytest.mark.parametrize("family", sorted(STOCK))
def test_te_key_set_is_what_megatrons_te_spec_declares(family, tmp_path):
    """``--transformer-impl transformer_engine``: our keys and shapes equal those of a model of megatron-core's TE
    layer spec (pre_mlp_layernorm separate on MoE layers, fused into linear_fc1 on dense ones); the checkpoint loads
    into it strictly with every parameter equal to its HF tensors, and converts back to HF bitwise."""
    from megatron.core.dist_checkpointing.validation import StrictHandling

    base = family.removesuffix("_mixed")
    src = save_tiny(base, tmp_path / "hf", **STOCK[family])
    config = AutoModelForCausalLM.from_pretrained(src).config
    model = te_twin_model(config)
    spec = model_spec(config, transformer_impl="transformer_engine")
    declared = {s.key: tuple(s.global_shape) for s in local_shards(model)}
    assert declared == mapping.global_shapes(spec)
    moe_norms = [k for k in declared if k.endswith("pre_mlp_layernorm.weight")]
    assert len(moe_norms) == 1 if spec.stacked else len(moe_norms) == sum(spec.moe_layers)
    mc, back = tmp_path / "mcore", tmp_path / "back"
    assert cli(["convert", "hf-to-mcore", str(src), str(mc), "--transformer-impl", "transformer_engine",
                "--no-progress"]) == 0
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(mc), strict=StrictHandling.RAISE_ALL)
    result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys and all(k.endswith("._extra_state") for k in result.missing_keys)
    hf = tensors(src)
    params = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    expected = {rule.module.format(layer=rule.layer, expert=rule.expert):
                mapping.to_mcore(spec, rule, [hf[n] for n in rule.hf]) for rule in mapping.rules(spec)}
    assert params.keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in params.items())
    assert cli(["convert", "mcore-to-hf", str(mc), str(back), "--no-progress"]) == 0
    assert_bitwise(hf, tensors(back))


@pytest.mark.gpu
def test_te_model_asks_for_the_te_key_set():
    """On a GPU machine with Transformer Engine: vespo's TE model asks for exactly the keys we write."""
    from megatron.core.models.gpt import gpt_layer_specs

    if not torch.cuda.is_available() or not gpt_layer_specs.HAVE_TE:
        pytest.skip("needs a CUDA device and NVIDIA Transformer Engine; the CPU equivalent is "
                    "test_te_key_set_is_what_megatrons_te_spec_declares")
    from vespo_megatron.convert.synthetic import tiny_config

    for family, overrides in STOCK.items():
        config = tiny_config(family.removesuffix("_mixed"), **overrides)
        model = build_megatron(config, use_te=True)
        declared = {s.key: tuple(s.global_shape) for s in local_shards(model)}
        assert declared == mapping.global_shapes(model_spec(config, transformer_impl="transformer_engine")), family
