"""What the packer puts where, against hand-derived layouts (both implementations)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vespo_megatron.packing import Sample, native, reference, restore_order

IMPLS = pytest.mark.parametrize("impl", [reference, native], ids=["numpy", "cpp"])


def three_samples() -> list[Sample]:
    """A: 2 + 3 tokens, one rollout log-prob missing; B: prompt only; C: one log-prob too many."""
    u8 = np.uint8
    return [
        Sample(np.array([11, 12]), np.array([21, 22, 23]), np.array([-0.5, -0.25]), np.array([1, 0, 1], u8),
               np.array([[[5, 6]], [[7, 1]], [[2, 3]], [[4, 0]]], u8), advantage=1.5, reward=1.0),
        Sample(np.array([31], np.int32), np.array([], np.int32), np.array([], np.float32), None,
               np.zeros((0, 1, 2), u8), advantage=-0.5, reward=0.0),
        Sample(np.array([33]), np.array([41]), np.array([-1.0, -2.0]), np.array([True]),
               np.array([[[6, 2]]], u8), advantage=0.25, reward=1.0),
    ]


@IMPLS
def test_hand_packed_cp1_sp2(impl):
    # n = [5, 1, 2] padded to 2cp = 2: [6, 2, 2] -> 10 slots, divisible by sp = 2: no tail pad.
    b = impl.pack(three_samples(), cp=1, sp=2, truncate=True, sample_ids=[4, 9, 2])
    np.testing.assert_array_equal(b.tokens, [[11, 12, 21, 22, 23, 0, 31, 0, 33, 41]])
    np.testing.assert_array_equal(b.position_ids, [[0, 1, 2, 3, 4, 5, 0, 1, 0, 1]])
    np.testing.assert_array_equal(b.seq_index, [[0, 0, 0, 0, 0, -1, 1, -1, 2, 2]])
    np.testing.assert_array_equal(b.loss_mask, [[0, 0, 1, 0, 1, 0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(b.rollout_logprobs, [[0, 0, -0.5, -0.25, 0, 0, 0, 0, 0, -1.0]])
    np.testing.assert_array_equal(b.rollout_logprob_valid[0], [0, 0, 1, 1, 0, 0, 0, 0, 0, 1])
    filler = [0, 1]
    np.testing.assert_array_equal(
        b.routing[0, :, 0], [[5, 6], [7, 1], [2, 3], [4, 0], filler, filler, filler, filler, [6, 2], filler])
    np.testing.assert_array_equal(b.cu_seqlens, [0, 5, 6, 8])
    np.testing.assert_array_equal(b.cu_seqlens_padded, [0, 6, 8, 10])
    assert b.max_seqlen == 6
    np.testing.assert_array_equal(b.advantages, [1.5, -0.5, 0.25])
    np.testing.assert_array_equal(b.rewards, [1.0, 0.0, 1.0])
    s = b.stats
    assert (s.samples, s.tokens, s.response_tokens, s.padded_tokens, s.tail_pad_tokens) == (3, 8, 4, 10, 0)
    assert (s.logprobs_missing, s.samples_missing, s.logprobs_truncated, s.samples_truncated) == (1, 1, 1, 1)
    assert s.routing_filler_rows == 3

    shard = b.shard(0, 1)  # SP rank 1: slots 5..9 of the routing; the whole local pack of tokens
    np.testing.assert_array_equal(shard.routing[:, 0], [filler, filler, filler, [6, 2], filler])
    np.testing.assert_array_equal(shard.tokens, b.tokens[0])
    assert shard.sp_slice == slice(5, 10) and shard.max_seqlen == 6


@IMPLS
def test_hand_packed_cp2_tail(impl):
    # n = [5, 1, 2] padded to 2cp = 4: [8, 4, 4], chunks [2, 1, 1]; 8 local slots, tail_align 3 -> t = 9.
    b = impl.pack(three_samples(), cp=2, sp=1, tail_align=3, truncate=True)
    np.testing.assert_array_equal(b.tokens, [[11, 12, 0, 0, 31, 0, 33, 0, 0], [21, 22, 23, 0, 0, 0, 41, 0, 0]])
    np.testing.assert_array_equal(b.position_ids, [[0, 1, 6, 7, 0, 3, 0, 3, 0], [2, 3, 4, 5, 1, 2, 1, 2, 0]])
    np.testing.assert_array_equal(b.loss_mask, [[0] * 9, [1, 0, 1, 0, 0, 0, 1, 0, 0]])
    assert b.stats.tail_pad_tokens == 2 and b.stats.padded_tokens == 16


def test_int32_sentinel_rows_pass_through():
    routing = np.array([[[3, 1], [-1, -1]], [[-1, -1], [0, 2]]], np.int32)  # [rows 2, layers 2, topk 2]
    sample = Sample(np.array([1, 2]), np.array([3]), routing=routing)
    for impl in (reference, native):
        b = impl.pack([sample], cp=1, sp=1)
        np.testing.assert_array_equal(b.routing[0, :2], routing)
        np.testing.assert_array_equal(b.routing[0, 2:], [[[0, 1], [0, 1]]] * 2)  # last token + pad: filler


def test_no_optional_fields_and_empty_batch():
    for impl in (reference, native):
        b = impl.pack([Sample(np.array([7]), np.array([8, 9]))], cp=1, sp=4)
        assert b.rollout_logprobs is None and b.routing is None and b.advantages is None
        np.testing.assert_array_equal(b.loss_mask, [[0, 1, 1, 0]])
        assert b.stats.logprobs_missing == 0
        empty = impl.pack([], cp=2, sp=2)
        assert empty.tokens.shape == (2, 0) and empty.max_seqlen == 0 and impl.unpack(empty, empty.tokens) == []


def test_torch_zero_copy_roundtrip():
    prompt = torch.arange(1, 4)
    b = native.pack([Sample(prompt.numpy(), torch.tensor([5, 6], dtype=torch.int32).numpy())], cp=1, sp=1)
    tokens = torch.from_numpy(b.tokens[0])
    assert tokens.data_ptr() == b.tokens.ctypes.data
    logprobs = torch.linspace(-1, 0, b.local_tokens).reshape(1, -1)
    (back,) = native.unpack(b, logprobs.numpy())
    np.testing.assert_array_equal(back, logprobs[0, :5].numpy())


def test_restore_order_over_micro_batches():
    samples = three_samples()
    batches = [native.pack([samples[2], samples[0]], sample_ids=[2, 0], truncate=True),
               native.pack([samples[1]], sample_ids=[1])]
    per_batch = [native.unpack(b, b.tokens) for b in batches]
    for s, tokens in zip(samples, restore_order(batches, per_batch, 3), strict=True):
        np.testing.assert_array_equal(tokens, np.concatenate([s.prompt, s.response]))
    with pytest.raises(ValueError, match="sample 1: not in any micro-batch"):
        restore_order(batches[:1], per_batch[:1], 3)
