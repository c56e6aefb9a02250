"""DeepSeek-V3 (multi-latent attention, shared experts, first-k dense layers, sigmoid router with expert bias, MTP
layers) against a stock Megatron-Core GPTModel built with MLA the way Megatron-LM builds it: ``MLATransformerConfig``
and megatron-core's own MLA layer specs (local, and the Transformer Engine spec realised with local modules of TE's
parameter names). Every tensor name and shape the converter writes equals the model's ``sharded_state_dict``; the
checkpoint loads strictly with every parameter equal to its HF tensor; HF -> Megatron -> HF is bitwise.

The stock model is only built, never run: three construction-time obstacles of megatron-core without CUDA and TE are
bridged here, by test-only stand-ins that own no parameters (names and shapes are untouched):
- MLA's rotary embedding asks ``torch.cuda.current_device()`` unless built with ``use_cpu_initialization`` (which
  MLA does not pass): it is built on the CPU (:func:`mla_on_cpu`);
- ``multi_latent_attention`` believes TE is installed (megatron's TE extension module imports without TE, with
  mock classes) and calls ``isinstance(linear_proj, TELinear)`` with a mock: its ``HAVE_TE`` is set to the truth;
- the local ``DotProductAttention`` takes no ``k_channels`` / ``v_channels`` (MLA's query/key and value head sizes
  differ), so the parameter-free core attention is :class:`CoreAttentionStandIn`.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from transformers import AutoModelForCausalLM

from vespo_megatron.cli import main as cli
from vespo_megatron.convert import mapping
from vespo_megatron.convert.errors import ConversionError
from vespo_megatron.convert.spec import model_spec
from vespo_megatron.convert.synthetic import tiny_config
from vespo_megatron.hf_config import moe_layers, padded_vocab
from vespo_megatron.megatron import compat
from vespo_megatron.megatron.parallel import init_parallel
from vespo_megatron.megatron.weights import local_shards

from tests.e2e.test_convert_megatron import _LocalTwinTEProvider, objects
from tests.e2e.test_convert_roundtrip import assert_bitwise, tensors



@pytest.fixture(scope="module", autouse=True)
def one_rank():
    init_parallel()


class CoreAttentionStandIn(MegatronModule):
    """Parameter-free stand-in for the core attention (softmax(q kᵀ) v owns no tensors), accepting MLA's arguments."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        super().__init__(config=config)


@pytest.fixture
def mla_on_cpu(monkeypatch):
    """MLA's RotaryEmbedding built on the CPU (``use_cpu_initialization``; only its inv_freq buffer, not saved);
    ``HAVE_TE`` of megatron's MLA module as it is (TE present only where ``gpt_layer_specs.HAVE_TE`` says so)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import multi_latent_attention

    monkeypatch.setattr(multi_latent_attention, "RotaryEmbedding",
                        partial(multi_latent_attention.RotaryEmbedding, use_cpu_initialization=True))
    monkeypatch.setattr(multi_latent_attention, "HAVE_TE", gpt_layer_specs.HAVE_TE)
    try:  # megatron-core 0.19+: MLA resolves its latent norms and up projections with the config's backend
        from megatron.core.transformer import mla_qk_norm_config
    except ImportError:
        return
    backend = mla_qk_norm_config.get_backend
    monkeypatch.setattr(mla_qk_norm_config, "get_backend", lambda impl: MLATwinTEProvider()
                        if impl == "transformer_engine" and not gpt_layer_specs.HAVE_TE else backend(impl))


def save_deepseek_v3(path: Path, mtp_layers: int = 0, **overrides) -> Path:
    """A tiny random DeepSeek-V3 saved by transformers (several shards), a non-zero expert bias; ``mtp_layers``
    extra MTP layers ``model.layers.{L…}`` (as the real checkpoint ships them) added to the files."""
    torch.manual_seed(0)
    config = tiny_config("deepseek_v3", vocab_size=250, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0, 0.05)
    model.save_pretrained(path, max_shard_size="100KB")
    if mtp_layers:
        from safetensors.torch import save_file

        last = {k: v for k, v in model.state_dict().items() if k.startswith(f"model.layers.{config.num_hidden_layers - 1}.")}
        mtp = {k.replace(f"layers.{config.num_hidden_layers - 1}.", f"layers.{config.num_hidden_layers + m}."): v.clone()
               for m in range(mtp_layers) for k, v in last.items()}
        mtp |= {f"model.layers.{config.num_hidden_layers}.{n}": torch.ones(config.hidden_size) for n in ("enorm.weight", "hnorm.weight")}
        save_file(mtp, path / "model-mtp.safetensors", metadata={"format": "pt"})
        index = path / "model.safetensors.index.json"
        import json

        data = json.loads(index.read_text())
        data["weight_map"] |= dict.fromkeys(mtp, "model-mtp.safetensors")
        index.write_text(json.dumps(data))
        config.num_nextn_predict_layers = mtp_layers
        config.save_pretrained(path)
    return path


def mla_config(hf, impl: str = "local"):
    """The MLATransformerConfig Megatron-LM makes of DeepSeek-V3's flags (--multi-latent-attention, --q-lora-rank,
    --kv-lora-rank, --qk-head-dim, --qk-pos-emb-head-dim, --v-head-dim, --qk-layernorm, the sigmoid router with
    expert bias and groups, shared experts, --moe-layer-freq as a list for the first-k dense layers)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
        ffn_hidden_size=hf.intermediate_size, q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
        qk_head_dim=hf.qk_nope_head_dim, qk_pos_emb_head_dim=hf.qk_rope_head_dim, v_head_dim=hf.v_head_dim,
        qk_layernorm=True, rope_type="rope", normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        num_moe_experts=hf.n_routed_experts, moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_shared_expert_intermediate_size=hf.moe_intermediate_size * hf.n_shared_experts,
        moe_router_topk=hf.num_experts_per_tok, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_num_groups=hf.n_group, moe_router_group_topk=hf.topk_group,
        moe_router_topk_scaling_factor=hf.routed_scaling_factor, moe_token_dispatcher_type="alltoall",
        moe_layer_freq=[int(m) for m in moe_layers(hf)], use_cpu_initialization=True, params_dtype=torch.float32,
        transformer_impl=impl)


def _with_stand_in_attention(layer_spec):
    layer_spec.submodules.self_attention.submodules.core_attention = CoreAttentionStandIn
    return layer_spec


def stock_mla_model(hf, impl: str = "local"):
    """A GPTModel of megatron-core's own MLA decoder: ``get_gpt_decoder_block_spec`` (local), or the TE layer specs
    of dense and MoE layers built with local modules of TE's parameter names (:class:`MLATwinTEProvider`)."""
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    config = mla_config(hf, impl)
    if impl == "local":
        block = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    else:
        if gpt_layer_specs.HAVE_TE:
            pytest.skip("Transformer Engine is installed: the TE twin stands in for it only where it is not")
        with compat.te_spec_provider(MLATwinTEProvider):
            layer = {moe: gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
                num_experts=config.num_moe_experts if moe else None, qk_layernorm=True, multi_latent_attention=True)
                for moe in (0, 1)}
        block = TransformerBlockSubmodules(layer_specs=[layer[f] for f in config.moe_layer_freq],
                                           layer_norm=WrappedTorchNorm)
    for layer_spec in block.layer_specs:
        _with_stand_in_attention(layer_spec)
    return GPTModel(config, block, vocab_size=padded_vocab(hf.vocab_size),
                    max_sequence_length=hf.max_position_embeddings, share_embeddings_and_output_weights=False,
                    position_embedding_type="none")


class MLATwinTEProvider(_LocalTwinTEProvider):
    """The TE provider's MLA answers with local modules: TE's ``TELinear`` (the down projections, duplicated over
    tp) by a column-parallel linear of the same parameter names (one rank: the same shapes)."""

    def linear(self):
        return ColumnParallelLinear


def converted(src: Path, dst: Path, *flags: str) -> Path:
    assert cli(["convert", "hf-to-mcore", str(src), str(dst), "--no-progress", *flags]) == 0
    return dst


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_names_and_shapes_equal_the_stock_mla_model(impl, tmp_path, mla_on_cpu):
    """Every key and global shape we write (and every linear's ``_extra_state`` object) equals the stock MLA model's
    sharded_state_dict; the default output loads strictly into it and every parameter equals its HF tensor."""
    src = save_deepseek_v3(tmp_path / "hf")  # dense layer 0, MoE layers 1-3 (first_k_dense_replace 1)
    hf = AutoModelForCausalLM.from_pretrained(src).config
    spec = model_spec(hf, transformer_impl=impl)
    assert spec.mla and not spec.stacked and spec.moe_layers == (False, True, True, True)
    model = stock_mla_model(hf, impl)
    declared = {s.key: tuple(s.global_shape) for s in local_shards(model)}
    assert declared == mapping.global_shapes(spec)
    assert {o.unique_key for o in objects(model.sharded_state_dict())} == \
        {mapping.extra_state_key(r) for r in mapping.rules(spec)} - {None}
    attention = {k.split("self_attention.")[1] for k in declared if ".0.self_attention." in k}
    norms = ({"q_layernorm.weight", "kv_layernorm.weight"} if impl == "local" else
             {"linear_q_up_proj.layer_norm_weight", "linear_kv_up_proj.layer_norm_weight"})
    assert attention == norms | {"linear_q_down_proj.weight", "linear_q_up_proj.weight", "linear_kv_down_proj.weight",
                                 "linear_kv_up_proj.weight", "linear_proj.weight"}
    assert {"decoder.layers.1.mlp.router.expert_bias", "decoder.layers.1.mlp.shared_experts.linear_fc1.weight",
            "decoder.layers.0.mlp.linear_fc1.weight"} <= declared.keys()
    mc = converted(src, tmp_path / "mcore", "--transformer-impl", impl)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(mc), strict=StrictHandling.RAISE_ALL)
    result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys and all(k.endswith("._extra_state") for k in result.missing_keys)
    source = tensors(src)
    expected = {rule.module.format(layer=rule.layer, expert=rule.expert):
                mapping.to_mcore(spec, rule, [source[n] for n in rule.hf]) for rule in mapping.rules(spec)}
    params = {k: v for k, v in model.state_dict().items()
              if not k.endswith("._extra_state") and not k.endswith("inv_freq")}
    assert params.keys() == expected.keys()
    for name, value in params.items():
        assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name
    assert {n for rule in mapping.rules(spec) for n in rule.hf} == set(source)  # every HF tensor went somewhere


@pytest.mark.parametrize("flags", [(), ("--transformer-impl", "transformer_engine")])
def test_round_trip_bitwise_and_mtp_layers_skipped(flags, tmp_path, capsys):
    """HF -> Megatron -> HF is bitwise; the MTP layer of the source is skipped with a note, not converted."""
    src = save_deepseek_v3(tmp_path / "hf", mtp_layers=1)
    source = tensors(src)
    mtp = {n for n in source if n.startswith("model.layers.4.")}
    assert mtp and "model.layers.4.enorm.weight" in mtp
    mc = converted(src, tmp_path / "mcore", *flags)
    assert "1 multi-token-prediction (MTP) layer(s) model.layers.4… not converted: skipped" in capsys.readouterr().err
    back = tmp_path / "back"
    assert cli(["convert", "mcore-to-hf", str(mc), str(back), "--no-progress"]) == 0
    assert_bitwise({n: t for n, t in source.items() if n not in mtp}, tensors(back))
    if not flags:  # the built-in verification still compares tensors; logits parity says why it cannot run
        assert cli(["convert", "verify", str(mc), str(back), "--no-progress"]) == 0
        assert cli(["convert", "verify", str(mc), str(src), "--logits", "--no-progress"]) == 2
        assert "multi-latent attention, which vespo's build_model does not build" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,match", [
    (dict(attention_bias=True), "attention_bias=true is not supported with multi-latent attention"),
    (dict(q_lora_rank=None), "q_lora_rank=null .* is not supported")])
def test_mla_configs_we_refuse(overrides, match):
    with pytest.raises(ConversionError, match=match):
        model_spec(tiny_config("deepseek_v3", **overrides))
