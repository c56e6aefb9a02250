"""Re-layouts (QKV interleave, GLU fusion, vocabulary padding, TP slices) against hand-built layouts."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from vespo_megatron.convert.cli import parse_size
from vespo_megatron.convert.rank_shards import local_slice
from vespo_megatron.hf_config import padded_vocab
from vespo_megatron.convert import mapping
from vespo_megatron.convert.spec import model_spec
from vespo_megatron.convert.synthetic import tiny_config

SPEC = model_spec(tiny_config("qwen3_moe"))


def rows(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1)


def rule_like(op: str, shape: tuple[int, ...], hf_shapes: list[tuple[int, ...]], **spec) -> tuple:
    """A (spec, rule) pair of ``op`` with the given sizes, from the tiny Qwen3-MoE mapping."""
    rule = next(r for r in mapping.rules(SPEC) if r.op == op)
    return dataclasses.replace(SPEC, **spec), dataclasses.replace(rule, shape=shape, hf_shapes=tuple(hf_shapes))


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ng: int) -> torch.Tensor:
    d = k.shape[0] // ng
    spec, rule = rule_like("qkv", (q.shape[0] + 2 * k.shape[0], *q.shape[1:]), [q.shape, k.shape, v.shape],
                           num_heads=q.shape[0] // d, num_kv_heads=ng, head_dim=d)
    return mapping.to_mcore(spec, rule, [q, k, v])


def fuse_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    spec, rule = rule_like("glu", (2 * gate.shape[0], *gate.shape[1:]), [gate.shape, up.shape])
    return mapping.to_mcore(spec, rule, [gate, up])


def pad_vocab(weight: torch.Tensor, padded: int) -> torch.Tensor:
    spec, rule = rule_like("vocab", (padded, *weight.shape[1:]), [weight.shape], vocab_size=weight.shape[0],
                           padded_vocab_size=padded)
    return mapping.to_mcore(spec, rule, [weight])


def test_qkv_interleave_by_group_by_hand():
    # nh = 4 heads, ng = 2 kv groups, d = 1: per group [q heads of the group; k_g; v_g].
    q, k, v = rows(0, 1, 2, 3), rows(10, 11), rows(20, 21)
    assert interleave_qkv(q, k, v, 2).flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_qkv_interleave_head_dim_2_bias_by_hand():
    # nh = 2, ng = 1 (MQA), d = 2, 1-D bias: [q0a q0b q1a q1b k_a k_b v_a v_b].
    q, k, v = torch.tensor([0.0, 1, 2, 3]), torch.tensor([10.0, 11]), torch.tensor([20.0, 21])
    assert interleave_qkv(q, k, v, 1).tolist() == [0, 1, 2, 3, 10, 11, 20, 21]
    # MHA (ng = nh = 2, d = 1): [q0 k0 v0 q1 k1 v1].
    assert interleave_qkv(torch.tensor([0.0, 1]), torch.tensor([10.0, 11]), torch.tensor([20.0, 21]), 2).tolist() == [
        0, 10, 20, 1, 11, 21]


def test_glu_fuse():
    assert fuse_glu(rows(1, 2), rows(3, 4)).flatten().tolist() == [1, 2, 3, 4]


def test_vocab_pad():
    w = torch.arange(6.0).reshape(3, 2)
    padded = pad_vocab(w, 5)
    assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [0, 0], [0, 0]]
    assert torch.equal(pad_vocab(w, 3), w)


@pytest.mark.parametrize("vocab,tp,div,expected", [(250, 1, 128, 256), (256, 2, 128, 256), (300, 2, 128, 512),
                                                    (129, 1, 64, 192), (151936, 4, 128, 152064)])
def test_padded_vocab(vocab, tp, div, expected):
    assert padded_vocab(vocab, tp, div) == expected


def test_tp_slices_by_hand():
    fc1 = rows(0, 1, 2, 3, 10, 11, 12, 13)  # [gate (4 rows); up (4 rows)]
    assert local_slice(fc1, "glu", 1, 2).flatten().tolist() == [2, 3, 12, 13]
    qkv = interleave_qkv(rows(0, 1, 2, 3), rows(10, 11), rows(20, 21), 2)  # TP2: one kv group per rank
    assert local_slice(qkv, "column", 1, 2).flatten().tolist() == [2, 3, 11, 21]
    proj = torch.arange(8.0).reshape(2, 4)
    assert local_slice(proj, "row", 0, 2).tolist() == [[0, 1], [4, 5]]
    assert torch.equal(local_slice(proj, "replicated", 1, 2), proj)
    with pytest.raises(ValueError, match="unknown"):
        local_slice(proj, "diagonal", 0, 2)


def test_parse_size():
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1048576") == 1048576
    assert parse_size("2k") == 2000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("four gigs")
