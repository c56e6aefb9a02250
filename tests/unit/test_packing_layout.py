"""Layout index maps against hand-derived layouts and against the definition (chunks r and 2cp−1−r)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vespo_megatron.packing.layout import build_layout, scatter, source_index, take


def test_hand_layout_cp2_sp2():
    # n = [3, 5], 2cp = 4 -> P = [4, 8], chunks c = [1, 2].
    # rank 0: seq0 chunks 0,3 -> pos 0,3; seq1 chunks 0,3 -> pos 0,1,6,7; 6 slots, tail_align 4 -> t = 8.
    # rank 1: seq0 chunks 1,2 -> pos 1,2; seq1 chunks 1,2 -> pos 2,3,4,5.
    lay = build_layout(np.array([3, 5]), cp=2, sp=2, tail_align=4)
    np.testing.assert_array_equal(lay.cu_seqlens, [0, 3, 8])
    np.testing.assert_array_equal(lay.cu_seqlens_padded, [0, 4, 12])
    assert lay.cu_seqlens.dtype == np.int32 and lay.cu_seqlens_padded.dtype == np.int32
    assert lay.max_seqlen == 8 and lay.local_tokens == 8
    np.testing.assert_array_equal(lay.position, [[0, 3, 0, 1, 6, 7, 0, 0], [1, 2, 2, 3, 4, 5, 0, 0]])
    np.testing.assert_array_equal(lay.seq_index, [[0, -1, 1, 1, -1, -1, -1, -1], [0, 0, 1, 1, 1, -1, -1, -1]])
    np.testing.assert_array_equal(lay.gather, [[0, -1, 3, 4, -1, -1, -1, -1], [1, 2, 5, 6, 7, -1, -1, -1]])
    np.testing.assert_array_equal(lay.sp_bounds, [0, 4, 8])


def test_hand_layout_cp1_sp4_tail():
    # n = [1, 3], 2cp = 2 -> P = [2, 4]: 6 slots, padded at the tail to t = 8 (multiple of sp = 4).
    lay = build_layout(np.array([1, 3]), cp=1, sp=4)
    np.testing.assert_array_equal(lay.position, [[0, 1, 0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(lay.gather, [[0, -1, 1, 2, 3, -1, -1, -1]])
    np.testing.assert_array_equal(lay.sp_bounds, [0, 2, 4, 6, 8])


def test_source_index_segments():
    # prompt 2 + response 3 tokens, rollout log-probs of the first 2 response tokens; routing rows n − 1 = 4.
    lay = build_layout(np.array([5]), cp=1, sp=1)
    np.testing.assert_array_equal(source_index(lay, [2], [2]), [[-1, -1, 0, 1, -1, -1]])
    np.testing.assert_array_equal(source_index(lay, [0], [4]), [[0, 1, 2, 3, -1, -1]])
    with pytest.raises(ValueError, match="sequence 0: segment"):
        source_index(lay, [2], [4])


def test_take_fill_row_and_scatter():
    lay = build_layout(np.array([2, 1]), cp=1, sp=1)  # P = [2, 2]: slots 0,1 | 2,(pad)
    rows = np.arange(6).reshape(3, 1, 2)
    out = take(rows, lay.gather, np.array([[7, 8]]))
    np.testing.assert_array_equal(out[0, :, 0], [[0, 1], [2, 3], [4, 5], [7, 8]])
    np.testing.assert_array_equal(scatter(out, lay.gather, 3), rows)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_lens": np.array([2, -1])}, "sequence 1: length -1 < 0"),
        ({"seq_lens": np.array([2]), "cp": 0}, "cp must be a positive integer"),
        ({"seq_lens": np.array([2]), "sp": -2}, "sp must be a positive integer"),
        ({"seq_lens": np.array([2.0])}, "1-D integer array"),
        ({"seq_lens": np.array([2**31])}, "overflows int32"),
    ],
)
def test_bad_layout_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_layout(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(0, 40), max_size=8),
    cp=st.sampled_from([1, 2, 4]),
    sp=st.sampled_from([1, 2, 4]),
    tail_align=st.sampled_from([1, 3, 8]),
)
def test_layout_matches_definition(lens, cp, sp, tail_align):
    lay = build_layout(np.array(lens, np.int64), cp, sp, tail_align)
    t = lay.local_tokens
    assert t % sp == 0 and t % tail_align == 0 and t * cp >= lay.cu_seqlens_padded[-1]
    assert t - lay.cu_seqlens_padded[-1] // cp < np.lcm(sp, tail_align)
    for r in range(cp):
        expected_pos, expected_seq = [], []
        for i, n in enumerate(lens):
            padded = -(-n // (2 * cp)) * 2 * cp
            c = padded // (2 * cp)
            for chunk in (r, 2 * cp - 1 - r):
                pos = list(range(chunk * c, (chunk + 1) * c))
                expected_pos += pos
                expected_seq += [i if p < n else -1 for p in pos]
        tail = t - len(expected_pos)
        np.testing.assert_array_equal(lay.position[r], expected_pos + [0] * tail)
        np.testing.assert_array_equal(lay.seq_index[r], expected_seq + [-1] * tail)
    # every real token appears exactly once over the CP ranks
    np.testing.assert_array_equal(np.sort(lay.gather[lay.gather >= 0]), np.arange(sum(lens)))
