"""Logits parity: the HF transformers model and the Megatron model run on the same tokens.

The Megatron model is vespo's ``build_model`` (local spec, current parallel state) loaded with the global tensors of
a converted checkpoint, or, without one, with the HF weights converted in memory by the same mapping. ``glm4_moe`` (DeepSeek-V3-style MoE with GQA attention) is built through its DeepSeek-V3
twin: the same MoE fields, with head size and q/k norm passed as overrides (full rotary only, as ``build_model`` has
no partial rotary). Metric: max |z_hf − z_mcore| over [batch, seq, V] (vocabulary padding columns excluded).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from vespo_megatron.convert.dcp_io import DcpCheckpoint
from vespo_megatron.convert.errors import ConversionError
from vespo_megatron.convert.hf_io import HfCheckpoint
from vespo_megatron.convert.inmemory import hf_to_mcore_tensors
from vespo_megatron.convert.spec import model_spec


def megatron_build_args(hf_config: Any) -> tuple[Any, dict[str, Any]]:
    """(config, TransformerConfig overrides) for ``build_model`` that give the architecture of ``hf_config``."""
    if hf_config.model_type != "glm4_moe":
        return hf_config, {}
    rope = dict(hf_config.rope_parameters or {})
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"glm4_moe: partial_rotary_factor={rope['partial_rotary_factor']} is not supported by build_model")
    from transformers import DeepseekV3Config

    fields = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
              "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
              "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps", "initializer_range", "attention_bias")
    twin = DeepseekV3Config(**{f: getattr(hf_config, f) for f in fields},
                            rope_parameters={"rope_type": "default", "rope_theta": rope.get("rope_theta", 10000.0)})
    return twin, {"kv_channels": hf_config.head_dim, "qk_layernorm": bool(hf_config.use_qk_norm)}


def build_megatron(hf_config: Any, dtype: torch.dtype = torch.float32, **kwargs: Any) -> torch.nn.Module:
    """vespo's Megatron GPTModel for ``hf_config`` under the current parallel state."""
    from vespo_megatron.megatron.model import build_model

    config, overrides = megatron_build_args(hf_config)
    return build_model(config, dtype=dtype, **overrides, **kwargs)


def read_global(ckpt: DcpCheckpoint, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Whole global tensors of a torch_dist checkpoint (model keys only; meant for models that fit in memory)."""
    keys = keys or [k for k in ckpt.tensors if k.startswith(("embedding.", "decoder.", "output_layer."))]
    return {key: ckpt.read(key, (), ckpt.tensors[key][0]) for key in keys}


def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] token ids -> [b, s, Vp / tp] logits of this rank (no masking beyond causal)."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


def hf_logits(hf_dir: str | Path, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    with torch.no_grad():
        return model(tokens).logits


def logits_parity(hf_dir: str | Path, mcore: str | Path | Mapping[str, torch.Tensor] | None = None, *, batch: int = 2,
                  seq: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Run both models (1 rank) on random tokens; return max and mean |Δ logits| and the logits' scale.

    ``mcore``: a torch_dist directory, global tensors by key, or None (convert ``hf_dir`` in memory).
    """
    from transformers import AutoConfig

    from vespo_megatron.megatron.parallel import init_parallel
    from vespo_megatron.megatron.weights import load_global

    hf_config = AutoConfig.from_pretrained(str(hf_dir))
    if hf_config.model_type == "deepseek_v3":
        raise ConversionError("--logits: the Megatron model of DeepSeek-V3 has multi-latent attention, which vespo's "
                              "build_model does not build (names and shapes are checked instead)", file=hf_dir)
    tokens = torch.randint(0, hf_config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    init_parallel()
    model = build_megatron(hf_config, dtype=dtype).eval()
    if mcore is None:
        with HfCheckpoint(hf_dir).session() as session:
            mcore = dict(hf_to_mcore_tensors(model_spec(hf_config), session.get))
    load_global(model, read_global(DcpCheckpoint(mcore)) if isinstance(mcore, (str, Path)) else mcore)
    ours = megatron_logits(model, tokens)[..., : hf_config.vocab_size].float()
    ref = hf_logits(hf_dir, tokens, dtype).float()
    diff = (ours - ref).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "max_abs_logit": ref.abs().max().item()}
