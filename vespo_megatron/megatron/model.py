"""Build a Megatron-Core MoE GPTModel from a Hugging Face config (Qwen3-MoE, Mixtral, DeepSeek-V3-style MoE).

``transformer_config(hf_config)`` maps the HF fields onto one ``TransformerConfig``; ``build_model`` builds the
GPTModel of the current pipeline stage under the current ``parallel_state``. The local spec (CPU) uses
:mod:`vespo_megatron.megatron.layers` (its attention runs context parallelism without Transformer Engine);
``use_te=True`` selects Transformer Engine's spec (GPU: fused kernels, TE's own context-parallel attention).
Routers: Qwen3-MoE/Mixtral softmax top-k renormalised over the k chosen (``moe_router_pre_softmax=False``; with
``norm_topk_prob=False`` softmax over all experts then top-k, ``pre_softmax=True``); DeepSeek-V3 style sigmoid scores
+ expert bias for the choice, unbiased sigmoid weights normalised and scaled, group-limited top-k, shared experts,
first-k dense layers. DeepSeek-V3 attention (MLA) is replaced by standard grouped-query attention here.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from transformers import PretrainedConfig

from vespo_megatron import hf_config
from vespo_megatron.hf_config import get as _get
from vespo_megatron.megatron.device import use_cpu
from vespo_megatron.megatron.layers import PackedDotProductAttention, TorchNorm

FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")

def moe_layer_pattern(hf: PretrainedConfig) -> list[int]:
    """[num_layers] 1 where the HF layer is an MoE layer, 0 where it is dense (Megatron's ``moe_layer_freq``)."""
    if hf.model_type not in FAMILIES:
        raise ValueError(f"model_type {hf.model_type!r} is not supported; choose one of {FAMILIES}")
    return [int(flag) for flag in hf_config.moe_layers(hf)]


def transformer_config(
    hf: PretrainedConfig,
    *,
    dtype: torch.dtype = torch.float32,
    routing_replay: bool = False,
    recompute: bool = False,
    dispatcher: str = "alltoall",
    **overrides: Any,
) -> TransformerConfig:
    """One TransformerConfig for ``hf`` under the current parallel_state (TP, PP, EP, CP sizes read from it)."""
    family = hf.model_type
    pattern = moe_layer_pattern(hf)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    moe: dict[str, Any] = dict(
        num_moe_experts=hf_config.num_experts(hf),
        moe_router_topk=hf.num_experts_per_tok,
        moe_ffn_hidden_size=_get(hf, "moe_intermediate_size", "intermediate_size"),
        # an integer when all layers are alike, as Megatron-LM passes it: the dist-checkpoint keys are then stacked
        # [L, …] as in stock Megatron checkpoints (a list makes Megatron use per-layer keys)
        moe_layer_freq=1 if len(set(pattern)) == 1 else pattern,
        moe_aux_loss_coeff=0.0,
        moe_router_load_balancing_type="none",
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=False,
        moe_enable_routing_replay=routing_replay,
        moe_router_dtype="fp64" if dtype == torch.float64 else "fp32",
    )
    if family == "deepseek_v3":
        moe.update(
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=0.0,
            moe_router_topk_scaling_factor=hf.routed_scaling_factor,
            moe_router_num_groups=hf.n_group,
            moe_router_group_topk=hf.topk_group,
            moe_shared_expert_intermediate_size=hf.moe_intermediate_size * hf.n_shared_experts,
            moe_router_pre_softmax=False,
        )
    else:
        moe.update(moe_router_score_function="softmax", moe_router_pre_softmax=not _get(hf, "norm_topk_prob", default=True))
    kwargs: dict[str, Any] = dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=hf_config.head_dim(hf),
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        qk_layernorm=family == "qwen3_moe",
        add_bias_linear=False,
        add_qkv_bias=bool(_get(hf, "attention_bias", default=False)),
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=hf.initializer_range,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=tp > 1,
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu(),  # on CUDA the weights are created on torch.cuda.current_device()
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        variable_seq_lengths=True,
        **moe,
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _local_layer_spec(config: TransformerConfig, moe: bool) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts if moe else None,
        moe_grouped_gemm=False,
        qk_layernorm=config.qk_layernorm,
        normalization="RMSNorm",
    )
    sub = spec.submodules
    attn = sub.self_attention.submodules
    attn_sub = dataclasses.replace(
        attn,
        core_attention=PackedDotProductAttention,
        q_layernorm=TorchNorm if config.qk_layernorm else attn.q_layernorm,
        k_layernorm=TorchNorm if config.qk_layernorm else attn.k_layernorm,
    )
    return dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            sub,
            input_layernorm=TorchNorm,
            pre_mlp_layernorm=TorchNorm,
            self_attention=dataclasses.replace(sub.self_attention, submodules=attn_sub),
        ),
    )


def _te_layer_spec(config: TransformerConfig, moe: bool) -> ModuleSpec:
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, RuntimeError) as err:
        raise RuntimeError(
            "use_te=True needs NVIDIA Transformer Engine (pip install 'vespo-megatron[gpu]' on a CUDA machine)"
        ) from err
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=config.num_moe_experts if moe else None, moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
    )


def decoder_block_spec(config: TransformerConfig, use_te: bool = False) -> ModuleSpec:
    """Per-layer specs (dense or MoE by ``moe_layer_freq``) of this pipeline stage's layers."""
    make = _te_layer_spec if use_te else _local_layer_spec
    freq = config.moe_layer_freq
    pattern = freq if isinstance(freq, list) else [int(bool(config.num_moe_experts) and i % freq == 0)
                                                   for i in range(config.num_layers)]
    specs = {moe: make(config, bool(moe)) for moe in set(pattern)}
    offset = get_transformer_layer_offset(config)
    count = get_num_layers_to_build(config)
    layers = [specs[flag] for flag in pattern[offset : offset + count]]
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm as norm
    else:
        norm = TorchNorm
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=layers, layer_norm=norm))


def build_model(
    hf: PretrainedConfig,
    *,
    dtype: torch.dtype = torch.float32,
    routing_replay: bool = False,
    use_te: bool = False,
    recompute: bool = False,
    dispatcher: str = "alltoall",
    **config_overrides: Any,
) -> GPTModel:
    """The GPTModel of this pipeline stage for ``hf`` (vocab padded to 128·TP, RoPE, tied embeddings as HF), its
    parameters in ``dtype`` on this rank's device (``device.local_device``); ``dtype=torch.bfloat16`` sets
    ``config.bf16`` (``step.wrap_ddp`` then adds Megatron's Float16Module)."""
    config = transformer_config(
        hf, dtype=dtype, routing_replay=routing_replay, recompute=recompute, dispatcher=dispatcher, **config_overrides
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, use_te),
        vocab_size=hf_config.padded_vocab(hf.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=hf.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(hf.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=hf_config.rope_theta(hf),
    )
    model.hf_config = hf
    return model.to(dtype)
