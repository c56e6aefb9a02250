"""The MoE GPTModel built from HF configs: configs map as documented, packed forward equals per-sequence forward."""
from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from vespo_megatron.hf_config import padded_vocab, tiny_hf_config
from vespo_megatron.megatron.model import build_model, moe_layer_pattern, transformer_config
from vespo_megatron.megatron.parallel import init_parallel


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    init_parallel()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_packed_forward_equals_separate_sequences(family):
    torch.manual_seed(0)
    model = build_model(tiny_hf_config(family), dtype=torch.float64)
    lens = [5, 7, 3]
    ids = torch.randint(0, 256, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 5, 12, 15], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    out = model(ids, pos, None, packed_seq_params=packed)
    sep = torch.cat([model(ids[:, a:b], pos[:, a:b], None) for a, b in zip(cu[:-1], cu[1:])], dim=1)
    assert out.shape == (1, 15, 256)
    assert torch.allclose(out, sep, atol=1e-12, rtol=0)
    # a different sequence boundary must change the result (attention really is per sequence)
    other = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 15], dtype=torch.int32),
                            cu_seqlens_kv=torch.tensor([0, 15], dtype=torch.int32), max_seqlen_q=15, max_seqlen_kv=15)
    assert not torch.allclose(model(ids, pos, None, packed_seq_params=other), out)


def test_config_mapping():
    qwen = transformer_config(tiny_hf_config("qwen3_moe", mlp_only_layers=[0]))
    assert (qwen.num_moe_experts, qwen.moe_router_topk, qwen.moe_ffn_hidden_size) == (8, 2, 32)
    assert qwen.qk_layernorm and qwen.moe_router_score_function == "softmax" and not qwen.moe_router_pre_softmax
    assert qwen.moe_layer_freq == [0, 1, 1, 1] and qwen.num_query_groups == 2 and qwen.kv_channels == 16
    dsv3 = transformer_config(tiny_hf_config("deepseek_v3"))
    assert dsv3.moe_router_score_function == "sigmoid" and dsv3.moe_router_enable_expert_bias
    assert dsv3.moe_shared_expert_intermediate_size == 32 and dsv3.moe_router_topk_scaling_factor == 2.5
    assert moe_layer_pattern(tiny_hf_config("deepseek_v3")) == [0, 1, 1, 1]
    assert not transformer_config(tiny_hf_config("mixtral", norm_topk_prob=False)).qk_layernorm


def test_vocab_padding():
    assert padded_vocab(256, 1) == 256
    assert padded_vocab(151936, 1) == 151936 and padded_vocab(151936, 2) == 152064
    assert padded_vocab(1000, 2) == 1024


def test_bad_inputs():
    with pytest.raises(ValueError, match="family 'llama'"):
        tiny_hf_config("llama")
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        build_model(tiny_hf_config("qwen3_moe"), use_te=True)
