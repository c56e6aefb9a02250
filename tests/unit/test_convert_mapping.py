"""The mapping's HF side against what transformers writes, its Megatron side by hand, the in-memory paths, the journal."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from vespo_megatron.convert import mapping
from vespo_megatron.convert.errors import ConversionError
from vespo_megatron.convert.inmemory import hf_to_mcore_tensors, mcore_to_hf_tensors
from vespo_megatron.convert.journal import Journal
from vespo_megatron.convert.spec import Layout, model_spec
from vespo_megatron.convert.synthetic import tiny_config

CASES = {
    "qwen3_moe": dict(mlp_only_layers=[1]),
    "mixtral": dict(),
    "glm4_moe": dict(tie_word_embeddings=True, attention_bias=True, use_qk_norm=True),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_hf_names_and_shapes_are_what_save_pretrained_writes(family, tmp_path):
    config = tiny_config(family, num_hidden_layers=3, **CASES[family])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        written = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    spec = model_spec(config)
    expected = {n: s for rule in mapping.rules(spec) for n, s in zip(rule.hf, rule.hf_shapes)}
    assert expected == written


def test_megatron_side_of_a_qwen3_layer_by_hand():
    spec = model_spec(tiny_config("qwen3_moe", vocab_size=250, mlp_only_layers=[1]))
    by_key = mapping.rules_by_key(spec)
    qkv = by_key["decoder.layers.0.self_attention.linear_qkv.weight"][0]
    # 4 heads, 2 kv groups, head 16: 2 · (2 + 2) · 16 rows; sources q, k, v.
    assert qkv.shape == (128, 64) and qkv.op == "qkv" and qkv.split == "column"
    assert qkv.hf == ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                      "model.layers.0.self_attn.v_proj.weight")
    fc1 = by_key["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"]
    assert [r.index for r in fc1] == [(e,) for e in range(8)] and fc1[3].global_shape == (8, 64, 64)
    assert fc1[3].hf == ("model.layers.0.mlp.experts.3.gate_proj.weight", "model.layers.0.mlp.experts.3.up_proj.weight")
    assert fc1[3].module == "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight"
    dense = by_key["decoder.layers.1.mlp.linear_fc1.weight"][0]
    assert dense.shape == (256, 64) and dense.split == "glu"
    assert by_key["embedding.word_embeddings.weight"][0].shape == (256, 64)  # 250 padded to 256
    norm = by_key["decoder.layers.2.mlp.linear_fc1.layer_norm_weight"][0]
    assert norm.hf == ("model.layers.2.post_attention_layernorm.weight",) and norm.module == "decoder.layers.{layer}.pre_mlp_layernorm.weight"
    assert mapping.extra_state_key(fc1[3]) == "decoder.layers.0.mlp.experts.experts.linear_fc1._extra_state/shard_3_8"
    assert mapping.extra_state_key(norm) is None


def test_default_layout_is_stock_megatrons():
    """Homogeneous models: stacked [L, …] keys (integer moe_layer_freq); mixed dense/MoE layers: per-layer keys."""
    assert model_spec(tiny_config("mixtral")).stacked and model_spec(tiny_config("qwen3_moe")).stacked
    assert not model_spec(tiny_config("qwen3_moe", mlp_only_layers=[1])).stacked
    assert not model_spec(tiny_config("glm4_moe")).stacked  # first_k_dense_replace=1
    assert model_spec(tiny_config("glm4_moe", first_k_dense_replace=0)).stacked
    per_layer = model_spec(tiny_config("mixtral"), stacked=False)
    assert "decoder.layers.3.mlp.router.weight" in mapping.global_shapes(per_layer)
    assert mapping.global_shapes(model_spec(tiny_config("mixtral")))["decoder.layers.mlp.router.weight"] == (4, 8, 64)


def test_stacked_keys_and_mixtral_legacy_names():
    spec = model_spec(tiny_config("mixtral"), stacked=True)
    fc2 = mapping.rules_by_key(spec)["decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    rule = next(r for r in fc2 if r.index == (2, 5))
    assert rule.global_shape == (4, 8, 64, 32) and rule.hf == ("model.layers.2.block_sparse_moe.experts.5.w2.weight",)
    assert mapping.extra_state_key(rule) == "decoder.layers.mlp.experts.experts.linear_fc2._extra_state/shard_2.5_4.8"
    with pytest.raises(ConversionError, match="homogeneous"):
        model_spec(tiny_config("qwen3_moe", mlp_only_layers=[0]), stacked=True)


@pytest.mark.parametrize("family", sorted(CASES))
def test_in_memory_round_trip_and_tied_lm_head(family):
    spec = model_spec(tiny_config(family, vocab_size=250, **CASES[family]))
    torch.manual_seed(0)
    hf = {n: torch.randn(s) for rule in mapping.rules(spec) for n, s in zip(rule.hf, rule.hf_shapes)}
    mcore = dict(hf_to_mcore_tensors(spec, hf.__getitem__))
    assert {k: tuple(v.shape) for k, v in mcore.items()} == mapping.global_shapes(spec)
    assert torch.all(mcore["embedding.word_embeddings.weight"][250:] == 0)
    back = dict(mcore_to_hf_tensors(spec, mcore, emit_tied_lm_head=True))
    extra = {"lm_head.weight"} if spec.tied else set()
    assert set(back) == set(hf) | extra
    assert all(torch.equal(back[n], hf[n]) for n in hf)
    if spec.tied:
        assert torch.equal(back["lm_head.weight"], hf["model.embed_tokens.weight"])
    with pytest.raises(KeyError, match="not a Megatron key"):
        list(mcore_to_hf_tensors(spec, [("decoder.layers.99.mlp.router.weight", torch.zeros(1))]))


def test_hf_rows_of_qkv_glu_and_vocab_by_hand():
    # nh 4, ng 2, d 16: per group [q 32; k 16; v 16] rows
    spec = model_spec(tiny_config("qwen3_moe", vocab_size=250), stacked=False)
    qkv, fc1, emb = (next(r for r in mapping.rules(spec) if r.key.endswith(k)) for k in
                     ("0.self_attention.linear_qkv.weight", "0.mlp.experts.experts.linear_fc1.weight", "word_embeddings.weight"))
    assert [r for _, _, r in mapping.hf_rows(spec, qkv)] == [((0, 32), (64, 96)), ((32, 48), (96, 112)), ((48, 64), (112, 128))]
    assert [r for _, _, r in mapping.hf_rows(spec, fc1)] == [((0, spec.moe_ffn),), ((spec.moe_ffn, 2 * spec.moe_ffn),)]
    assert mapping.hf_rows(spec, emb) == [(mapping.EMBEDDING, (250, spec.hidden), ((0, 250),))]


@settings(max_examples=25, deadline=None)
@given(ng=st.integers(1, 4), hpg=st.integers(1, 4), d=st.integers(1, 4), h=st.integers(1, 3))
def test_to_hf_inverts_the_qkv_interleave(ng, hpg, d, h):
    spec = dataclasses.replace(model_spec(tiny_config("qwen3_moe")), num_heads=ng * hpg, num_kv_heads=ng, head_dim=d, hidden=h)
    rule = next(r for r in mapping.rules(spec) if r.op == "qkv")
    rule = dataclasses.replace(rule, shape=(ng * (hpg + 2) * d, h), hf_shapes=((ng * hpg * d, h), (ng * d, h), (ng * d, h)))
    q, k, v = (torch.randn(s) for s in rule.hf_shapes)
    back = mapping.to_hf(spec, rule, mapping.to_mcore(spec, rule, [q, k, v]))
    assert [n for n, _ in back] == list(rule.hf) and all(torch.equal(a, b) for (_, a), b in zip(back, (q, k, v)))


def test_layout_checks_name_the_config():
    spec = model_spec(tiny_config("qwen3_moe"))
    with pytest.raises(ConversionError, match="tp=3 does not divide num_attention_heads=4"):
        Layout(tp=3).check(spec, "cfg/config.json")
    with pytest.raises(ConversionError, match=r"cfg/config.json: ep=3 does not divide num experts=8"):
        Layout(ep=3).check(spec, "cfg/config.json")
    with pytest.raises(ConversionError, match="kv groups"):
        Layout(tp=4).check(spec, "cfg/config.json")  # 4 heads but 2 kv groups
    Layout(tp=2, ep=8, etp=1).check(spec, "cfg/config.json")


def test_journal_refuses_foreign_or_nonempty_destinations(tmp_path):
    dest = tmp_path / "out"
    journal = Journal(dest, {"a": 1}, resume=False)
    assert not dest.exists()  # validation writes nothing
    journal.begin()
    journal.mark(3, {"x": [1, 2]})
    assert journal.is_done(3) and not journal.is_done(2) and journal.payload(3) == {"x": [1, 2]}
    with pytest.raises(ConversionError, match="not empty"):
        Journal(dest, {"a": 1}, resume=False)
    with pytest.raises(ConversionError, match="another source or other options"):
        Journal(dest, {"a": 2}, resume=True)
    assert Journal(dest, {"a": 1}, resume=True).resuming
    journal.finish()
    (dest / "model.safetensors").write_bytes(b"done")
    with pytest.raises(ConversionError, match="no conversion journal"):
        Journal(dest, {"a": 1}, resume=True)
