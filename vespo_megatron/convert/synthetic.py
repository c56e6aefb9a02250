"""Tiny configs of every family and synthetic HF checkpoints, for tests and benchmarks.

``tiny_config(family)`` gives vespo's tiny test sizes (hidden 64, 4 layers, 8 experts top-2, vocab 256);
``glm4_moe`` is the DeepSeek-V3-style MoE with GQA attention (4 heads, 2 kv groups of 16, full rotary).
``write_synthetic`` writes an HF directory with random tensors of exactly the names and shapes the mapping expects,
one safetensors file per layer and generated layer by layer, so checkpoints larger than memory can be made.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vespo_megatron.convert import mapping
from vespo_megatron.convert.hf_io import INDEX, index_json, shard_name
from vespo_megatron.convert.spec import model_spec

_GLM4_TINY: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    partial_rotary_factor=1.0, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
    initializer_range=0.02,
)


def tiny_config(family: str, **overrides: Any):
    """A small transformers config of ``family`` (qwen3_moe, mixtral: vespo's tiny sizes; glm4_moe: see module doc)."""
    if family == "glm4_moe":
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(**{**_GLM4_TINY, **overrides})
    from vespo_megatron.hf_config import tiny_hf_config

    return tiny_hf_config(family, **{"initializer_range": 0.02, **overrides})


def write_synthetic(directory: str | Path, hf_config: Any, dtype: torch.dtype = torch.float32, seed: int = 0) -> int:
    """Write config.json and random weights (std 0.02) as an HF checkpoint, one shard per unit; return its bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(directory)
    spec = model_spec(hf_config)
    generator = torch.Generator().manual_seed(seed)
    units = mapping.units(spec)
    weight_map: dict[str, str] = {}
    total = 0
    for k, unit in enumerate(units):
        tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(dtype)
                   for rule in unit.rules for name, shape in zip(rule.hf, rule.hf_shapes)}
        name = shard_name(k + 1, len(units))
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX).write_text(index_json(weight_map, total))
    return total
