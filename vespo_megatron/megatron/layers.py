"""Layer-spec components for the local (non Transformer Engine) GPT spec, so CPU runs the same data layout as GPU.

- :class:`TorchNorm`: torch RMSNorm/LayerNorm that also works under sequence parallelism (its parameters are marked
  ``sequence_parallel`` so ``finalize_model_grads`` sums their gradients over the tensor-parallel group).
- :class:`PackedDotProductAttention`: Megatron's local core attention refuses packed (THD) input and context
  parallelism; this one accepts ``packed_seq_params`` and runs causal attention per packed sequence (segments given
  by ``cu_seqlens_q_padded``, or ``cu_seqlens_q``), grouped-query heads included, and under context parallelism
  (cp > 1) attends over the whole sequence gathered from the CP group. On GPU, Transformer Engine's attention does
  both natively (``use_te=True``).

Context parallelism (the packer's zig-zag, Megatron's layout): padded sequence i of P_i tokens (P_i a multiple of
2·cp) is cut into 2·cp chunks of c_i = P_i / 2cp tokens; CP rank r holds chunks r and 2cp−1−r, so its local slot j
of sequence i sits at global position g(j) = r·c_i + j for j < c_i, else (2cp−1−r)·c_i + (j − c_i). Keys and values
of every rank are all-gathered over the CP group ([cp·t, ng, hn], K and V in one collective), put back in global
order, and the local queries attend to the keys at positions ≤ g(j) (each local chunk to the keys up to its own end
only). The gather's backward is a reduce-scatter: each
rank receives the sum over all ranks' queries of dK/dV for the slots it holds.

Why all-gather rather than a ring of p2p exchanges: the ring overlaps transfers with compute on GPUs, where
Transformer Engine's CP attention (p2p / a2a / all_gather) is used anyway; on the CPU path the all-gather is one
collective per layer (two with the backward) instead of 2·(cp−1), it reuses Megatron's autograd-aware
``gather_from_sequence_parallel_region`` (forward all-gather, backward reduce-scatter), and each query's softmax is
computed in one piece as on 1 rank (a ring merges per-block partial softmaxes), which keeps parity with the 1-rank
run at fp64 round-off. Its cost is
memory: each rank holds the K/V of whole sequences, [cp·t, ng, 2·hn], usually small next to the queries under GQA.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
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


def zigzag_gather_index(bounds: list[int], cp: int) -> torch.Tensor:
    """[cp·t] int64: for each global slot (segments in order, each in position order), its row in the CP all-gather
    [cp·t] (rank-major: rank ρ's local slot l at ρ·t + l). ``bounds`` are the LOCAL segment offsets [0, ..., t]."""
    t = bounds[-1]
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        c = (end - start) // 2
        # global chunk k < cp is rank k's first half, chunk k ≥ cp rank 2cp−1−k's second half
        for k in range(2 * cp):
            rank, offset = (k, 0) if k < cp else (2 * cp - 1 - k, c)
            pieces.append(torch.arange(c) + rank * t + start + offset)
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


class PackedDotProductAttention(DotProductAttention):
    """Causal attention for ``sbhd`` ([s, b, np, hn]) and packed ``thd`` ([t, np, hn]) inputs, cp ≥ 1.

    Returns [s, b, np·hn] (sbhd) or [t, np·hn] (thd). Query/key/value heads: np query heads per partition, ng kv
    groups per partition (np % ng == 0). Scale: ``self.softmax_scale``. No dropout (RL training runs without it).
    Under CP, input and output hold this rank's zig-zag slots (sbhd: the sequence dimension s, as Megatron's
    ``get_batch_on_this_cp_rank`` cuts it; thd: every packed segment, as ``cu_seqlens_q_padded`` / cp).
    """

    def __init__(self, config: TransformerConfig, *args, pg_collection=None, **kwargs) -> None:
        # DotProductAttention asserts context_parallel_size == 1; the rest of its set-up is what we want
        local = copy.copy(config)
        local.context_parallel_size = 1
        super().__init__(local, *args, pg_collection=pg_collection, **kwargs)
        self.config = config
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()
        self.cp = config.context_parallel_size
        if self.cp > 1 and self.cp_group.size() != self.cp:
            raise ValueError(f"context_parallel_size {self.cp} but the CP group has {self.cp_group.size()} ranks")

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
            # [s, b, n, d]: one segment of s local slots per batch row
            s = query.shape[0]
            key, value = self._gather_kv(key, value)  # [cp·s, b, ng, d] in global order
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, n, s, d]
            out = self._attend(q, k, v, s)
            return out.permute(2, 0, 1, 3).reshape(s, query.shape[1], -1)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"PackedDotProductAttention: qkv_format {packed_seq_params.qkv_format!r} unsupported")
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        bounds = self._local_bounds(cu.tolist(), query.shape[0])
        key, value = self._gather_kv(key, value, bounds)
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            # [t_i, n, d] -> [1, n, t_i, d]; keys: the cp·t_i slots of the whole segment
            k, v = (x[self.cp * start : self.cp * end].transpose(0, 1).unsqueeze(0) for x in (key, value))
            q = query[start:end].transpose(0, 1).unsqueeze(0)
            pieces.append(self._attend(q, k, v, end - start)[0].transpose(0, 1))
        out = torch.cat(pieces, dim=0)
        return out.reshape(query.shape[0], -1)

    def _local_bounds(self, cu: list[int], local_tokens: int) -> list[int]:
        """Local segment offsets [0, ..., t] from the global padded ``cu_seqlens`` (each multiple of 2·cp)."""
        if any(b % (2 * self.cp) for b in cu) and self.cp > 1:
            raise ValueError(f"cu_seqlens_q_padded {cu} must be multiples of 2·cp = {2 * self.cp}")
        bounds = [b // self.cp for b in cu]
        if bounds[-1] > local_tokens:
            raise ValueError(f"cu_seqlens ends at {cu[-1]} but the packed input has {local_tokens}·{self.cp} tokens")
        if bounds[-1] < local_tokens:
            if self.cp > 1:
                raise ValueError(f"cu_seqlens_q_padded ends at {cu[-1]}, short of the {local_tokens}·{self.cp} "
                                 "packed tokens: under context parallelism the tail pad must be a segment")
            bounds.append(local_tokens)  # micro-batch tail padding attends among itself only
        return bounds

    def _gather_kv(self, key: torch.Tensor, value: torch.Tensor, bounds: Optional[list[int]] = None):
        """All-gather K and V ([t, ...] each) over the CP group -> [cp·t, ...] each, segments in global order."""
        if self.cp == 1:
            return key, value
        width = key.shape[-1]
        both = gather_from_sequence_parallel_region(
            torch.cat([key, value], dim=-1), tensor_parallel_output_grad=True, group=self.cp_group
        )
        index = zigzag_gather_index(bounds if bounds is not None else [0, key.shape[0]], self.cp)
        both = both.index_select(0, index.to(both.device))
        return both[..., :width], both[..., width:]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: int) -> torch.Tensor:
        """[b, np, s_q, hn] x [b, ng, s_k, hn] -> [b, np, s_q, hn]; query j sees the keys at global positions ≤ g(j).

        cp = 1: s_q = s_k, plain causal attention. cp > 1: s_k = cp·s_q; each of the two local chunks (global
        positions [a, a + c)) attends to keys [0, a + c) only, with the causal mask on that range (bottom-right
        aligned), so a rank computes (2cp + 1)·c² scores instead of 2c·cp·2c.
        """
        gqa = q.shape[1] != k.shape[1]
        if self.cp == 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa)
        if local % 2:
            raise ValueError(f"a context-parallel segment holds an even number of local slots, got {local}")
        c, rank = local // 2, self.cp_group.rank()
        out = []
        for half, chunk in enumerate((rank, 2 * self.cp - 1 - rank)):
            start, end = chunk * c, (chunk + 1) * c
            positions = torch.arange(start, end, device=q.device)
            mask = torch.arange(end, device=q.device)[None, :] <= positions[:, None]  # [c, end]
            out.append(F.scaled_dot_product_attention(
                q[:, :, half * c : (half + 1) * c], k[:, :, :end], v[:, :, :end],
                attn_mask=mask, scale=self.softmax_scale, enable_gqa=gqa,
            ))
        return torch.cat(out, dim=2)
