"""C++ packer == numpy reference, bit for bit, on random samples; pack -> unpack is the identity."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vespo_megatron import _packer
from vespo_megatron.packing import Sample, build_layout, native, reference

ARRAY_FIELDS = (
    "sample_ids", "prompt_lens", "response_lens", "cu_seqlens", "cu_seqlens_padded", "tokens", "position_ids",
    "seq_index", "loss_mask", "rollout_logprobs", "rollout_logprob_valid", "routing", "advantages", "rewards",
)


@st.composite
def batches(draw):
    """Random micro-batch: lengths (0-length responses, length-1 sequences), dtypes, optional fields, cp, sp."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    routing_dtype = draw(st.sampled_from([None, np.uint8, np.uint16, np.int32]))
    layers, topk = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    has_lp, truncate = draw(st.booleans()), draw(st.booleans())
    samples = []
    for _ in range(draw(st.integers(0, 6))):
        p, r = int(rng.integers(1, 10)), int(rng.choice([0, 1, int(rng.integers(0, 14))]))
        ids = rng.choice([np.int32, np.int64])
        lp = None
        if has_lp:
            m = int(rng.integers(0, r + (3 if truncate else 0) + 1))
            lp = (-rng.exponential(size=m) * rng.integers(0, 2, m)).astype(rng.choice([np.float32, np.float64]))
        mask = rng.choice([None, np.bool_, np.uint8])
        routing = None
        if routing_dtype is not None:
            low = -1 if routing_dtype == np.int32 else 0  # int32 may carry −1 sentinel rows
            routing = rng.integers(low, 7, (p + r - 1, layers, topk)).astype(routing_dtype)
        samples.append(
            Sample(
                prompt=rng.integers(0, 1000, p).astype(ids),
                response=rng.integers(0, 1000, r).astype(ids),
                rollout_logprobs=lp,
                loss_mask=None if mask is None else rng.integers(0, 2, r).astype(mask),
                routing=routing,
                advantage=float(rng.normal()),
            )
        )
    parallel = {"cp": draw(st.sampled_from([1, 2, 4])), "sp": draw(st.sampled_from([1, 2, 4])),
                "tail_align": draw(st.sampled_from([1, 8]))}
    return samples, parallel, truncate


def assert_same_batch(a, b):
    for field in ARRAY_FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, (field, x.dtype, y.dtype, x.shape, y.shape)
            assert x.tobytes() == y.tobytes(), field
    assert a.stats == b.stats
    assert (a.cp, a.sp, a.tail_align, a.max_seqlen) == (b.cp, b.sp, b.tail_align, b.max_seqlen)


@settings(max_examples=400, deadline=None)
@given(batches())
def test_native_equals_reference_and_roundtrip(batch):
    samples, parallel, truncate = batch
    ids = np.arange(len(samples)) * 3 + 7
    ref = reference.pack(samples, truncate=truncate, sample_ids=ids, **parallel)
    nat = native.pack(samples, truncate=truncate, sample_ids=ids, **parallel)
    assert_same_batch(ref, nat)

    full = [np.concatenate([s.prompt, s.response]).astype(np.int64) for s in samples]
    for impl in (reference, native):
        for seq, tokens in zip(impl.unpack(nat, nat.tokens), full, strict=True):
            np.testing.assert_array_equal(seq, tokens)
    # float per-token outputs with a trailing axis (e.g. [cp, t, 2] log-prob + entropy) come back identically
    values = np.random.default_rng(0).normal(size=nat.tokens.shape + (2,)).astype(np.float32)
    for x, y in zip(reference.unpack(ref, values), native.unpack(nat, values), strict=True):
        assert x.tobytes() == y.tobytes()
    if samples and samples[0].routing is not None:
        unpacked = native.unpack(nat, nat.routing)
        for s, rows in zip(samples, unpacked, strict=True):
            np.testing.assert_array_equal(rows[:-1], s.routing)
            np.testing.assert_array_equal(rows[-1], np.broadcast_to(np.arange(rows.shape[2]), rows.shape[1:]))


@settings(max_examples=200, deadline=None)
@given(
    lens=st.lists(st.integers(0, 30), max_size=8),
    cp=st.sampled_from([1, 2, 4]),
    sp=st.sampled_from([1, 2, 4]),
    tail_align=st.sampled_from([1, 3, 8]),
)
def test_native_index_maps_equal_reference(lens, cp, sp, tail_align):
    lay = build_layout(np.array(lens, np.int64), cp, sp, tail_align)
    nat = _packer.layout(np.array(lens, np.int64), cp, sp, tail_align)
    for field in ("position", "seq_index", "gather", "sp_bounds", "cu_seqlens", "cu_seqlens_padded"):
        x, y = getattr(lay, field), nat[field]
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), field


def test_threaded_packing_equals_reference():
    """Batches big enough for the C++ thread split (≥ 4 MiB of work per thread): same bytes, same first error."""
    rng = np.random.default_rng(1)
    samples = [
        Sample(rng.integers(0, 9, p), rng.integers(0, 9, r), -rng.random(r), None,
               rng.integers(0, 64, (p + r - 1, 2, 8)).astype(np.uint8))
        for p, r in rng.integers(1, 8000, (140, 2))
    ]  # ~1.1M tokens: > 8 MiB of validation work and of output, so three threads share each pass
    threads = native.get_num_threads()
    try:
        native.set_num_threads(3)
        nat, ref = native.pack(samples, cp=2, sp=2), reference.pack(samples, cp=2, sp=2)
        assert_same_batch(ref, nat)
        values = rng.normal(size=nat.tokens.shape + (4,))
        for x, y in zip(reference.unpack(ref, values), native.unpack(nat, values), strict=True):
            assert x.tobytes() == y.tobytes()
        # two bad samples in different thread ranges: the error names the first one
        samples[5].response[3] = -1
        samples[130].rollout_logprobs[0] = np.nan
        messages = []
        for impl in (reference, native):
            with pytest.raises(ValueError) as err:
                impl.pack(samples)
            messages.append(str(err.value))
        assert messages[0] == messages[1] == "sample 5: response: index 3 holds a negative token id"
    finally:
        native.set_num_threads(threads)
