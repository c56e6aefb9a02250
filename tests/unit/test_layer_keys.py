"""The norm keys read from megatron-core's layer specs (local and Transformer Engine), against hand values; the
stand-in TE provider against megatron's TESpecProvider where Transformer Engine is installed."""
from __future__ import annotations

import pytest

from vespo_megatron.convert import mapping
from vespo_megatron.convert.errors import ConversionError
from vespo_megatron.convert.spec import model_spec
from vespo_megatron.convert.synthetic import tiny_config
from vespo_megatron.megatron import compat, layer_keys

QKV_NORM, FC1_NORM = "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"


def test_te_spec_code_unchanged():
    """The stand-in relies on get_gpt_layer_with_transformer_engine_spec building its spec from TESpecProvider()."""
    want = compat.fingerprint_for(compat.TE_SPEC_FINGERPRINTS, compat.megatron_version())
    assert want is not None, f"no TE-spec fingerprint for megatron-core {compat.megatron_version()}"
    assert compat.source_fingerprint(compat.TE_SPEC_TARGETS) == want


def test_norm_keys_by_hand():
    local = {"input_layernorm": ("input_layernorm.weight", QKV_NORM),
             "pre_mlp_layernorm": ("pre_mlp_layernorm.weight", FC1_NORM)}
    assert layer_keys.norm_keys("local", False) == layer_keys.norm_keys("local", True) == local
    assert layer_keys.norm_keys("transformer_engine", False) == {"input_layernorm": (QKV_NORM, QKV_NORM),
                                                                 "pre_mlp_layernorm": (FC1_NORM, FC1_NORM)}
    assert layer_keys.norm_keys("transformer_engine", True) == {
        "input_layernorm": (QKV_NORM, QKV_NORM),
        "pre_mlp_layernorm": ("pre_mlp_layernorm.weight", "pre_mlp_layernorm.weight")}  # MoE: kept separate
    with pytest.raises(ValueError, match="--transformer-impl 'te'"):
        layer_keys.norm_keys("te", True)


def test_te_key_set_of_a_mixed_model():
    spec = model_spec(tiny_config("qwen3_moe", mlp_only_layers=[1]), transformer_impl="transformer_engine")
    keys = set(mapping.global_shapes(spec))
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in keys and f"decoder.layers.1.{FC1_NORM}" in keys
    assert f"decoder.layers.0.{FC1_NORM}" not in keys and "decoder.layers.1.pre_mlp_layernorm.weight" not in keys
    local = set(mapping.global_shapes(model_spec(tiny_config("qwen3_moe", mlp_only_layers=[1]))))
    renamed = {f"decoder.layers.{i}.{FC1_NORM}" for i in (0, 2, 3)}
    assert keys - local == {k.replace(FC1_NORM, "pre_mlp_layernorm.weight") for k in renamed}
    assert local - keys == renamed
    with pytest.raises(ConversionError, match="--transformer-impl 'te'"):
        model_spec(tiny_config("mixtral"), transformer_impl="te")
