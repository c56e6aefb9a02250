"""What the converter needs to know about a model, read from its HF config through transformers' config classes.

Families (HF ``model_type``):
- ``qwen3_moe``: GQA attention with per-head q/k RMSNorm, softmax top-k router, dense layers from ``mlp_only_layers`` /
  ``decoder_sparse_step``.
- ``mixtral``: GQA attention, softmax top-k router; checkpoints use the legacy ``block_sparse_moe.experts.e.w1|w3|w2``
  names (w1 = gate, w3 = up, w2 = down).
- ``glm4_moe``: the DeepSeek-V3-style MoE (sigmoid router with expert bias ``e_score_correction_bias``, group-limited
  top-k, shared experts, first-k dense layers) with GQA attention (optional qkv bias and q/k norm).
- ``deepseek_v3``: the same MoE with multi-latent attention (MLA: q LoRA down/up projections with a latent norm, a
  joint kv down projection carrying the shared rope key, kv up projection); its multi-token-prediction (MTP) layers
  ``model.layers.{L…}`` (``num_nextn_predict_layers``) are skipped with a note.

The interpretation of the HF config (MoE layer pattern, expert counts, sizes, vocabulary padding) is
:mod:`vespo_megatron.hf_config`, shared with the model builder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vespo_megatron import hf_config
from vespo_megatron.convert.errors import ConversionError

FAMILIES = ("qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3")
TRANSFORMER_IMPLS = ("local", "transformer_engine")  # Megatron-LM's --transformer-impl


@dataclass(frozen=True)
class ModelSpec:
    """Sizes and structure of one MoE decoder (H hidden, nh query heads, ng kv groups of head_dim d, E experts;
    MLA: q / kv latent ranks, per-head nope / rope / value sizes, all 0 without MLA)."""

    family: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    tied: bool
    moe_layers: tuple[bool, ...]  # [num_layers] True where the layer is an MoE layer
    num_experts: int
    ffn: int  # dense-layer intermediate size F
    moe_ffn: int  # per-expert intermediate size
    shared_ffn: int  # shared-expert intermediate size (0: none)
    qk_norm: bool
    qkv_bias: bool
    expert_bias: bool  # sigmoid router with e_score_correction_bias
    stacked: bool  # dist-checkpoint keys with a leading layer axis (homogeneous layers) instead of per-layer keys
    transformer_impl: str = "local"  # the layer spec whose keys are written: local | transformer_engine
    q_lora_rank: int = 0  # MLA q latent size
    kv_lora_rank: int = 0  # MLA kv latent size (0: no MLA)
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    mtp_layers: int = 0  # multi-token-prediction layers of the HF checkpoint (not converted)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def mla(self) -> bool:
        """True for multi-latent attention (DeepSeek-V3)."""
        return self.kv_lora_rank > 0


@dataclass(frozen=True)
class Layout:
    """A Megatron parallel layout: tensor, pipeline, expert and expert-tensor parallel sizes (etp None: = tp)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def check(self, spec: ModelSpec, config_file: str | Path) -> None:
        """Raise if the layout cannot hold the model (heads, kv groups, experts, layers, FFN not divisible)."""
        for name, size in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep), ("etp", self.expert_tp)):
            if size < 1:
                raise ConversionError(f"{name}={size} must be >= 1", file=config_file)
        pairs = [
            ("num_attention_heads", spec.num_heads, "tp", self.tp),
            ("num_key_value_heads (kv groups)", spec.num_kv_heads, "tp", self.tp),
            ("intermediate_size", spec.ffn, "tp", self.tp),
            ("num_hidden_layers", spec.num_layers, "pp", self.pp),
        ]
        if spec.num_experts:
            pairs += [("num experts", spec.num_experts, "ep", self.ep), ("moe_intermediate_size", spec.moe_ffn, "etp", self.expert_tp)]
        if spec.shared_ffn:
            pairs.append(("shared expert intermediate size", spec.shared_ffn, "tp", self.tp))
        if spec.mla and spec.transformer_impl == "local":  # the local spec splits the down projections over tp
            pairs += [("q_lora_rank", spec.q_lora_rank, "tp", self.tp),
                      ("kv_lora_rank + qk_rope_head_dim", spec.kv_lora_rank + spec.qk_rope_head_dim, "tp", self.tp)]
        for what, count, name, size in pairs:
            if count % size:
                raise ConversionError(f"{name}={size} does not divide {what}={count}", file=config_file)


def load_hf_config(path: str | Path):
    """The transformers config of an HF directory or config.json file, for a family the converter supports."""
    try:
        hf = hf_config.load_hf_config(path)
    except hf_config.HFConfigError as err:
        raise ConversionError(err.reason, file=err.file) from err
    path = Path(path)
    _check_family(hf.model_type, path / "config.json" if path.is_dir() else path)
    return hf


def _check_family(model_type: str | None, file: str | Path) -> None:
    try:
        hf_config.check_family(model_type, file, FAMILIES)
    except hf_config.HFConfigError as err:
        raise ConversionError(err.reason, file=err.file) from err


def model_spec(hf, *, tp: int = 1, divisible_by: int = 128, stacked: bool | None = None,
               transformer_impl: str = "local", config_file: str | Path = "config.json") -> ModelSpec:
    """The :class:`ModelSpec` of a transformers config (vocabulary padded for ``tp``).

    ``stacked``: None (default) gives the keys a stock Megatron-Core GPTModel asks for (integer ``moe_layer_freq``):
    stacked [L, …] layer keys when every layer is alike (all MoE or all dense), per-layer keys when dense and MoE
    layers are mixed; True / False force stacked / per-layer keys. ``transformer_impl`` (Megatron-LM's
    ``--transformer-impl``): local | transformer_engine, the layer spec whose norm keys are written.
    """
    family = hf.model_type
    _check_family(family, config_file)
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ConversionError(f"--transformer-impl {transformer_impl!r}: choose one of {', '.join(TRANSFORMER_IMPLS)}",
                              file=config_file)
    pattern = hf_config.moe_layers(hf)
    homogeneous = len(set(pattern)) == 1
    if stacked and not homogeneous:
        raise ConversionError("stacked layer keys need homogeneous layers, but dense and MoE layers are mixed", file=config_file)
    stacked = homogeneous if stacked is None else stacked
    mla = family == "deepseek_v3"
    if mla and getattr(hf, "attention_bias", False):
        raise ConversionError("attention_bias=true is not supported with multi-latent attention", file=config_file)
    if mla and not hf.q_lora_rank:  # megatron-core 0.19 fuses a q norm into linear_q_proj there, 0.16 has none
        raise ConversionError("q_lora_rank=null (q projected without a LoRA) is not supported: megatron-core's MLA "
                              "layers differ there between versions", file=config_file)
    return ModelSpec(
        family=family,
        num_layers=hf.num_hidden_layers,
        hidden=hf.hidden_size,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads,
        head_dim=hf_config.head_dim(hf),
        vocab_size=hf.vocab_size,
        padded_vocab_size=hf_config.padded_vocab(hf.vocab_size, tp, divisible_by),
        tied=bool(hf.tie_word_embeddings),
        moe_layers=pattern,
        num_experts=hf_config.num_experts(hf) if any(pattern) else 0,
        ffn=hf.intermediate_size,
        moe_ffn=hf_config.moe_ffn(hf),
        shared_ffn=hf_config.shared_ffn(hf),
        qk_norm=family == "qwen3_moe" or bool(getattr(hf, "use_qk_norm", False)),
        qkv_bias=bool(getattr(hf, "attention_bias", False)),
        expert_bias=hf_config.expert_bias(hf),
        stacked=stacked,
        transformer_impl=transformer_impl,
        q_lora_rank=int(hf.q_lora_rank) if mla else 0,
        kv_lora_rank=int(hf.kv_lora_rank) if mla else 0,
        qk_nope_head_dim=int(hf.qk_nope_head_dim) if mla else 0,
        qk_rope_head_dim=int(hf.qk_rope_head_dim) if mla else 0,
        v_head_dim=int(hf.v_head_dim) if mla else 0,
        mtp_layers=int(getattr(hf, "num_nextn_predict_layers", 0) or 0),
    )


def fp8_block(hf, config_file: str | Path = "config.json") -> tuple[int, int]:
    """The [rows, cols] block of FP8 block scales (``quantization_config.weight_block_size``; 128×128 without one)."""
    quant = getattr(hf, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant and (quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3"):
        raise ConversionError(f"quantization_config {quant.get('quant_method')}/{quant.get('fmt')} is not supported "
                              "(block-scaled fp8 e4m3 only)", file=config_file)
    block = quant.get("weight_block_size") or (128, 128)
    if len(block) != 2:
        raise ConversionError(f"quantization_config.weight_block_size {block} is not [rows, cols]", file=config_file)
    return int(block[0]), int(block[1])
