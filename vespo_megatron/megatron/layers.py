"""Layer-spec components for the local (non Transformer Engine) GPT spec, so CPU runs the same data layout as GPU.

- :class:`TorchNorm`: torch RMSNorm/LayerNorm that also works under sequence parallelism (its parameters are marked
  ``sequence_parallel`` so ``finalize_model_grads`` sums their gradients over the tensor-parallel group).
- :class:`PackedDotProductAttention`: Megatron's local core attention refuses packed (THD) input; this one accepts
  ``packed_seq_params`` and runs causal attention per packed sequence (segments given by ``cu_seqlens_q_padded``, or
  ``cu_seqlens_q``), grouped-query heads included. On GPU, Transformer Engine's attention does this natively.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_config import TransformerConfig


class TorchNorm:
    """Factory with WrappedTorchNorm's signature returning ``torch.nn.RMSNorm``/``LayerNorm`` (eps, hidden_size)."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            raise ValueError("TorchNorm: layernorm_zero_centered_gamma is not supported")
        kind = config.normalization
        if kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"TorchNorm: normalization {kind!r} is not supported (RMSNorm, LayerNorm)")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class PackedDotProductAttention(DotProductAttention):
    """Causal attention for ``sbhd`` ([s, b, np, hn]) and packed ``thd`` ([t, np, hn]) inputs.

    Returns [s, b, np·hn] (sbhd) or [t, np·hn] (thd). Query/key/value heads: np query heads per partition, ng kv
    groups per partition (np % ng == 0). Scale: ``self.softmax_scale``. No dropout (RL training runs without it).
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("PackedDotProductAttention: attention_bias is not supported")
        if self.config.attention_dropout and self.training:
            raise ValueError("PackedDotProductAttention: attention dropout is not supported (set it to 0)")
        if packed_seq_params is None:
            # [s, b, n, d] -> [b, n, s, d]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            out = self._causal(q, k, v)  # [b, np, s, hn]
            return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"PackedDotProductAttention: qkv_format {packed_seq_params.qkv_format!r} unsupported")
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        bounds = cu.tolist()
        if bounds[-1] > query.shape[0]:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]} but the packed input has {query.shape[0]} tokens")
        if bounds[-1] < query.shape[0]:
            bounds.append(query.shape[0])  # micro-batch tail padding attends among itself only
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            # [t_i, n, d] -> [1, n, t_i, d]
            q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
            pieces.append(self._causal(q, k, v)[0].transpose(0, 1))
        out = torch.cat(pieces, dim=0)
        return out.reshape(query.shape[0], -1)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[b, np, s, hn] x [b, ng, s, hn] -> [b, np, s, hn]; kv groups shared by np/ng query heads."""
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
        )
