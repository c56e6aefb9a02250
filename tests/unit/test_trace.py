"""Routing traces: SGLang's routed_experts format decodes to the packed MoE rows; every bad input is named."""
from __future__ import annotations

import base64
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vespo_megatron.routing.trace import (
    PackedTrace,
    SampleRouting,
    TraceError,
    TracePart,
    TraceSpec,
    decode_batch,
    pack,
    storage_dtype,
)

# 4 HF layers, layer 0 dense (first-k-dense), 8 experts, top-2
SPEC = TraceSpec(num_hf_layers=4, moe_layers=(1, 2, 3), num_experts=8, topk=2)


def b64(array: np.ndarray, dtype: str = "int32") -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


def random_rows(rng: np.random.Generator, rows: int, spec: TraceSpec = SPEC) -> np.ndarray:
    """[rows, num_hf_layers, k] int32 as SGLang sends it: k distinct ids in MoE layers, zeros in dense layers."""
    out = np.zeros((rows, spec.num_hf_layers, spec.topk), np.int32)
    for layer in spec.moe_layers:
        for r in range(rows):
            out[r, layer] = rng.choice(spec.num_experts, spec.topk, replace=False)
    return out


def one(data, num_tokens: int, dtype: str | None = None, start: int = 0) -> SampleRouting:
    return SampleRouting((TracePart(data, start, dtype),), num_tokens)


def test_hand_decoded_example():
    # 3 HF layers (0 dense), k=2, E=4; a sample of 3 tokens has 2 rows
    spec = TraceSpec(3, (1, 2), 4, 2)
    rows = np.array([[[0, 0], [1, 3], [2, 0]], [[0, 0], [3, 2], [1, 2]]], np.int32)
    packed = decode_batch([one(b64(rows), 3)], spec)
    assert packed.ids.dtype == np.uint8
    np.testing.assert_array_equal(packed.ids, [[[1, 3], [2, 0]], [[3, 2], [1, 2]]])
    np.testing.assert_array_equal(packed.offsets, [0, 2])


def test_sglang_format_str_bytes_arrays_and_narrow_dtypes_agree():
    rng = np.random.default_rng(0)
    lens = [5, 9, 2]  # tokens per sample
    full = [random_rows(rng, n - 1) for n in lens]
    expected = np.concatenate([f[:, list(SPEC.moe_layers)] for f in full])
    variants = {
        "str": [one(b64(f), n) for f, n in zip(full, lens)],
        "bytes": [one(b64(f).encode(), n) for f, n in zip(full, lens)],
        "ndarray": [one(f, n) for f, n in zip(full, lens)],
        "tensor": [one(torch.from_numpy(f.astype(np.int64)), n) for f, n in zip(full, lens)],
        "flat tensor": [one(torch.from_numpy(f.reshape(-1).copy()), n) for f, n in zip(full, lens)],
    }
    for name in ("uint8", "uint16", "int16", "int8"):
        variants[name] = [one(b64(f, name), n, name) for f, n in zip(full, lens)]
    variants["uint8 ndarray"] = [one(f.astype(np.uint8), n, "uint8") for f, n in zip(full, lens)]
    for name, samples in variants.items():
        packed = decode_batch(samples, SPEC)
        np.testing.assert_array_equal(packed.ids, expected, err_msg=name)
        np.testing.assert_array_equal(packed.offsets, [0, 4, 12, 13], err_msg=name)
        assert packed.ids.dtype == np.uint8, name


def test_start_len_parts_are_laid_in_order():
    rng = np.random.default_rng(1)
    n = 12
    turn1 = random_rows(rng, 7)  # rows [0, 7): the first turn's request
    turn2 = random_rows(rng, n - 1 - 5)  # second request with routed_experts_start_len=5 covers [5, 11)
    sample = SampleRouting((TracePart(b64(turn1), 0), TracePart(b64(turn2).encode(), 5)), n)
    expected = np.concatenate([turn1[:5], turn2])[:, list(SPEC.moe_layers)]
    np.testing.assert_array_equal(decode_batch([sample], SPEC).ids, expected)
    # a single request with start_len covering the end and an earlier one covering the start
    head, tail = random_rows(rng, 4), random_rows(rng, n - 1 - 4)
    sample = SampleRouting((TracePart(head), TracePart(tail, 4)), n)
    np.testing.assert_array_equal(decode_batch([sample], SPEC).ids,
                                  np.concatenate([head, tail])[:, list(SPEC.moe_layers)])


def test_from_meta_info_reads_the_named_dtype():
    rng = np.random.default_rng(2)
    rows = random_rows(rng, 6)
    meta = {"routed_experts": b64(rows, "uint16"), "routed_experts_dtype": "uint16"}
    packed = decode_batch([SampleRouting((TracePart.from_meta_info(meta),), 7)], SPEC)
    np.testing.assert_array_equal(packed.ids, rows[:, 1:])


def test_storage_is_the_narrowest_dtype_and_k_bytes_per_token_layer():
    assert storage_dtype(256, allow_missing=False) == np.uint8
    assert storage_dtype(255, allow_missing=True) == np.uint8
    assert storage_dtype(256, allow_missing=True) == np.uint16  # the missing code 256 needs 9 bits
    assert storage_dtype(257, allow_missing=False) == np.uint16
    spec = TraceSpec(2, (0, 1), 256, 8)
    rng = np.random.default_rng(3)
    packed = decode_batch([one(b64(random_rows(rng, 99, spec)), 100)], spec)
    assert packed.ids.nbytes / (99 * spec.num_moe_layers) == spec.topk


def test_missing_rows_are_stored_as_the_expert_count():
    rows = random_rows(np.random.default_rng(4), 5)
    rows[2, 3] = -1
    packed = decode_batch([one(rows, 6)], SPEC, allow_missing=True)
    np.testing.assert_array_equal(packed.ids[2, 2], [SPEC.num_experts] * 2)
    np.testing.assert_array_equal(packed.ids[3], rows[3, 1:])
    with pytest.raises(TraceError, match="negative id") as err:
        decode_batch([one(rows, 6)], SPEC)
    assert (err.value.layer, err.value.row) == (3, 2)


def test_spec_from_megatron_config_and_pattern():
    assert TraceSpec.from_layer_pattern([0, 1, 0, 1], 8, 2) == TraceSpec(4, (1, 3), 8, 2)
    config = SimpleNamespace(num_layers=6, moe_layer_freq=2, num_moe_experts=16, moe_router_topk=4)
    assert TraceSpec.from_transformer_config(config) == TraceSpec(6, (0, 2, 4), 16, 4)
    with pytest.raises(ValueError, match="topk"):
        TraceSpec(4, (1,), 2, 3)


def test_select_keeps_the_chosen_samples_in_order():
    rng = np.random.default_rng(5)
    rows = [random_rows(rng, r)[:, 1:] for r in (3, 1, 4)]
    packed = pack(rows, SPEC)
    sub = packed.select([2, 0])
    assert isinstance(sub, PackedTrace)
    np.testing.assert_array_equal(sub.ids, np.concatenate([rows[2], rows[0]]))
    np.testing.assert_array_equal(sub.offsets, [0, 4, 7])


# ------------------------------------------------------------------------------------------------------ bad inputs
def _good(n: int = 6) -> np.ndarray:
    return random_rows(np.random.default_rng(6), n - 1)


def _edit(**where) -> np.ndarray:
    rows = _good()
    for (r, layer, value) in where.values():
        rows[r, layer] = value
    return rows


BAD = {
    # name: (samples, expected (layer, row), message fragment); the bad sample is always named "s1"
    "malformed base64": ([one("QUJD$$==", 6)], (None, None), "malformed base64"),
    "wrong dtype (uint8 bytes unnamed)": ([one(b64(_good(), "uint8"), 6)], (None, None), "wrong dtype"),
    "wrong dtype (unknown name)": ([one(b64(_good()), 6, "float32")], (None, None), "wrong dtype"),
    "wrong dtype (float array)": ([one(_good().astype(np.float32), 6)], (None, None), "wrong dtype"),
    "wrong dtype (narrow array unnamed)": ([one(_good().astype(np.int16), 6)], (None, None), "wrong dtype"),
    "wrong row count (partial row)": ([one(b64(_good().reshape(-1)[:-3]), 6)], (None, 4), "wrong row count"),
    "id >= E": ([one(_edit(a=(3, 2, [1, 8])), 6)], (2, 3), "id >= num_experts 8"),
    "negative id": ([one(_edit(a=(1, 1, [-2, 4])), 6)], (1, 1), "negative id"),
    "duplicate ids": ([one(_edit(a=(4, 3, [5, 5])), 6)], (3, 4), "duplicate ids"),
    "all-zero MoE layer": ([one(_edit(a=(slice(None), 2, 0)), 6)], (2, None), "not captured"),
    "wrong layer count (array)": ([one(np.zeros((5, 5, 2), np.int32), 6)], (None, None), "wrong layer count"),
    "wrong layer count (flat)": ([one(b64(_good()[:, :3]), 6)], (None, 0), "wrong layer count"),
    "wrong topk (array)": ([one(np.zeros((5, 4, 3), np.int32), 6)], (None, None), "wrong topk"),
    "wrong layer count or topk (flat)": ([one(b64(np.ones((5, 4, 3), np.int32)), 6)], (None, 0), "or topk"),
    "different sample length": ([one(b64(_good(8)), 6)], (None, 5), "different sample length"),
    "mixed dtypes in one batch": ([one(torch.from_numpy(_good().astype(np.int64)), 6)], (None, None), "mixed dtypes"),
    "empty trace (string)": ([one("", 6)], (None, 0), "empty trace"),
    "empty trace (no part)": ([SampleRouting((), 6)], (None, None), "empty trace"),
    "gap between parts": ([SampleRouting((TracePart(b64(_good(4))), TracePart(b64(_good(3)), 4)), 6)],
                          (None, 3), "have no trace"),
    "start_len out of range": ([one(b64(_good()), 6, start=7)], (None, None), "outside"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_sample_layer_and_row(name):
    samples, (layer, row), fragment = BAD[name]
    batch = [one(b64(_good()), 6)] + samples  # a good sample first, so the bad one is sample "s1"
    with pytest.raises(TraceError) as err:
        decode_batch(batch, SPEC, sample_ids=["s0", "s1"])
    assert fragment in str(err.value)
    assert err.value.sample == "s1"
    assert (err.value.layer, err.value.row) == (layer, row)
    text = str(err.value)
    assert "sample s1" in text
    assert (f"layer {layer}" if layer is not None else "all layers") in text
    assert (f"row {row}" if row is not None else "all rows") in text


def test_at_least_twelve_bad_input_classes():
    classes = {name.split(" (")[0] for name in BAD}
    assert len(classes) >= 12, classes
