"""What vespo-megatron reads from a Hugging Face MoE config: the one interpretation shared by the model builder
(``megatron/``), the converter (``convert/``), the trainer and the mismatch tool.

Families (HF ``model_type``):
- ``qwen3_moe``: GQA attention with per-head q/k RMSNorm, softmax top-k router; dense layers from
  ``mlp_only_layers`` / ``decoder_sparse_step``.
- ``mixtral``: GQA attention, softmax top-k router, every layer MoE.
- ``glm4_moe`` and ``deepseek_v3``: the DeepSeek-V3-style MoE (sigmoid router with expert bias, group-limited top-k,
  shared experts, the first ``first_k_dense_replace`` layers dense).

Vocabulary padding follows Megatron: ``padded = ceil(V / (divisible_by · tp)) · divisible_by · tp``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES = ("qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3")


class HFConfigError(ValueError):
    """A config that cannot be used; renders as ``file: message``."""

    def __init__(self, message: str, *, file: str | Path | None = None) -> None:
        self.file = None if file is None else str(file)
        self.reason = message
        super().__init__(f"{self.file}: {message}" if self.file else message)


def load_hf_config(path: str | Path):
    """The transformers config of an HF directory (its config.json) or of a config.json file.

    Raises:
        HFConfigError: no config.json, invalid JSON, or a ``model_type`` outside :data:`FAMILIES`.
    """
    from transformers import AutoConfig

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise HFConfigError("config.json not found", file=file)
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise HFConfigError(f"not valid JSON ({err})", file=file) from err
    check_family(model_type, file, FAMILIES)
    return AutoConfig.from_pretrained(str(file.parent) if file.name == "config.json" else str(file))


def check_family(model_type: str | None, file: str | Path, supported: tuple[str, ...] = FAMILIES) -> None:
    """Raise :class:`HFConfigError` unless ``model_type`` is one of ``supported``."""
    if model_type not in supported:
        raise HFConfigError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported)}", file=file
        )


def get(hf: Any, *names: str, default: Any = None) -> Any:
    """The first of the attributes ``names`` that ``hf`` has and is not None, else ``default``."""
    for name in names:
        value = getattr(hf, name, None)
        if value is not None:
            return value
    return default


def moe_layers(hf: Any) -> tuple[bool, ...]:
    """[num_hidden_layers] True where the HF decoder layer is an MoE layer (dense layers: False)."""
    family, n = hf.model_type, hf.num_hidden_layers
    if family == "qwen3_moe":
        dense = set(hf.mlp_only_layers or [])
        return tuple(i not in dense and num_experts(hf) > 0 and (i + 1) % hf.decoder_sparse_step == 0 for i in range(n))
    if family == "mixtral":
        return (True,) * n
    return tuple(i >= hf.first_k_dense_replace for i in range(n))


def num_experts(hf: Any) -> int:
    """Routed experts per MoE layer."""
    return int(get(hf, "num_experts", "num_local_experts", "n_routed_experts", default=0))


def head_dim(hf: Any) -> int:
    """Attention head size (``head_dim``, else hidden / heads)."""
    if hf.model_type == "deepseek_v3":
        return hf.hidden_size // hf.num_attention_heads
    return int(get(hf, "head_dim", default=hf.hidden_size // hf.num_attention_heads))


def moe_ffn(hf: Any) -> int:
    """Per-expert intermediate size (Mixtral's experts use ``intermediate_size``)."""
    return hf.intermediate_size if hf.model_type == "mixtral" else hf.moe_intermediate_size


def expert_bias(hf: Any) -> bool:
    """True for the DeepSeek-V3-style sigmoid router with ``e_score_correction_bias``."""
    return hf.model_type in ("glm4_moe", "deepseek_v3")


def shared_ffn(hf: Any) -> int:
    """Shared-expert intermediate size (0: no shared expert)."""
    shared = get(hf, "n_shared_experts", default=0) if expert_bias(hf) else 0
    return hf.moe_intermediate_size * shared if shared else 0


def rope_theta(hf: Any) -> float:
    params = getattr(hf, "rope_parameters", None) or {}
    return float(params.get("rope_theta", get(hf, "rope_theta", default=10000.0)))


def padded_vocab(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Megatron's padded vocabulary: the next multiple of divisible_by·tp (``--make-vocab-size-divisible-by``)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


_TINY: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=512,
        tie_word_embeddings=False, rms_norm_eps=1e-6, initializer_range=0.2, router_aux_loss_coef=0.0,
    ),
    "mixtral": dict(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        tie_word_embeddings=False, rms_norm_eps=1e-6, initializer_range=0.2, router_aux_loss_coef=0.0,
    ),
    "deepseek_v3": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6, initializer_range=0.2,
    ),
}


def tiny_hf_config(family: str = "qwen3_moe", **overrides: Any) -> Any:
    """A small random-init config of ``family`` (hidden 64, 4 layers, 8 experts top-2, vocab 256)."""
    from transformers import AutoConfig

    if family not in _TINY:
        raise ValueError(f"family {family!r} has no tiny config; choose one of {', '.join(_TINY)}")
    return AutoConfig.for_model(family, **{**_TINY[family], **overrides})
