"""Tensor re-layouts between HF and Megatron-Core weights (pure functions, no names).

QKV interleave by kv group (ng groups, hpg = nh / ng query heads per group, head size d, trailing dims ``*``):
    q [nh·d, *], k [ng·d, *], v [ng·d, *]  ->  qkv [ng·(hpg+2)·d, *]
    where block g = [q heads g·hpg … g·hpg+hpg-1 ; k_g ; v_g]. Works for weights ([·, H]) and biases ([·]).
Gated linear unit: gate [F, *], up [F, *] -> fc1 [2F, *] = [gate; up] (the global Megatron layout; under TP each rank
holds [gate_shard; up_shard], see :mod:`vespo_megatron.convert.layout`).
Vocabulary: [V, H] <-> [Vp, H] with zero rows V..Vp-1 (Megatron's padding to a multiple of 128·tp).
"""
from __future__ import annotations

import torch


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[nh·d, *], [ng·d, *], [ng·d, *] -> [ng·(hpg+2)·d, *] grouped as (q heads of g, k_g, v_g) per group g."""
    tail = q.shape[1:]
    d = k.shape[0] // num_groups
    q = q.reshape(num_groups, -1, *tail)  # [ng, hpg·d, *]
    k = k.reshape(num_groups, d, *tail)
    v = v.reshape(num_groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`interleave_qkv`: [ng·(hpg+2)·d, *] -> q [nh·d, *], k [ng·d, *], v [ng·d, *]."""
    tail = qkv.shape[1:]
    hpg = num_heads // num_groups
    grouped = qkv.reshape(num_groups, (hpg + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [hpg * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(), v.reshape(-1, *tail).contiguous()


def fuse_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[F, *], [F, *] -> [2F, *] = [gate; up]."""
    return torch.cat([gate, up], dim=0)


def split_glu(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2F, *] -> gate [F, *], up [F, *]."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """[V, H] -> [Vp, H] with zero rows appended (Vp >= V)."""
    extra = padded_size - weight.shape[0]
    if extra < 0:
        raise ValueError(f"vocabulary {weight.shape[0]} is larger than the padded size {padded_size}")
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])], dim=0)


def strip_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[Vp, H] -> [V, H] (the padding rows dropped)."""
    return weight[:vocab_size].contiguous()
