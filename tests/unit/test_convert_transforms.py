"""Re-layouts (QKV interleave, GLU fusion, vocabulary padding, TP slices) against hand-built layouts and inverses."""
from __future__ import annotations

import argparse

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vespo_megatron.convert.cli import parse_size
from vespo_megatron.convert.rank_shards import local_slice
from vespo_megatron.convert.spec import padded_vocab
from vespo_megatron.convert.transforms import fuse_glu, interleave_qkv, pad_vocab, split_glu, split_qkv, strip_vocab


def rows(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1)


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


@settings(max_examples=25, deadline=None)
@given(ng=st.integers(1, 4), hpg=st.integers(1, 4), d=st.integers(1, 4), h=st.integers(1, 3))
def test_split_qkv_inverts_interleave(ng, hpg, d, h):
    q, k, v = torch.randn(ng * hpg * d, h), torch.randn(ng * d, h), torch.randn(ng * d, h)
    back = split_qkv(interleave_qkv(q, k, v, ng), ng * hpg, ng, d)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_glu_fuse_and_split():
    gate, up = rows(1, 2), rows(3, 4)
    assert fuse_glu(gate, up).flatten().tolist() == [1, 2, 3, 4]
    g, u = split_glu(fuse_glu(gate, up))
    assert torch.equal(g, gate) and torch.equal(u, up)


def test_vocab_pad_and_strip():
    w = torch.arange(6.0).reshape(3, 2)
    padded = pad_vocab(w, 5)
    assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [0, 0], [0, 0]]
    assert torch.equal(strip_vocab(padded, 3), w)
    with pytest.raises(ValueError, match="larger than the padded size"):
        pad_vocab(w, 2)


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
