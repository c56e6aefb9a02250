"""Routing traces: SGLang's ``meta_info["routed_experts"]`` decoded, validated and stored compactly (pure numpy).

Received format (SGLang ``--enable-return-routed-experts``): base64 (str or bytes) of a flat row-major little-endian
int32 array of logical shape [rows, num_hf_layers, topk], rows = prompt_len + completion_len − 1 − start_len. Row p
is the routing of the forward whose input is token p (it predicts token p + 1); the last generated token never had a
forward, so the layout gives it one filler row (see :mod:`vespo_megatron.routing.shard`). Dense layers are zero rows.
A narrower dtype (uint8, uint16, int8, int16) is read only where the caller names it (SGLang's
``routed_experts_dtype``, other codecs); arrays and tensors are taken as they are (int32 or int64 when unnamed).

Multi-turn: a sample's routing may come in parts, one per request, part j with ``routed_experts_start_len`` s_j
covering rows [s_j, s_j + rows_j). Parts are laid down in order (a later part overwrites rows it covers; no gap is
allowed) and together cover rows [0, n − 1), n = prompt + completion tokens.

Storage (:class:`PackedTrace`): MoE layers only, every sample concatenated, ids [Σ rows_i, num_moe_layers, topk] with
offsets [S + 1], in uint8 when every code fits, else uint16. A missing (row, layer) — all k ids −1 on input,
accepted only with ``allow_missing`` — is stored as the code ``num_experts`` and is routed live at replay.

Every bad input raises :class:`TraceError` (a ValueError) naming the sample, the layer (HF index) and the row.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

NAMED_DTYPES = ("int32", "int16", "int8", "uint16", "uint8")  # what a caller may name for str/bytes data
UNNAMED_ARRAY_DTYPES = ("int32", "int64")  # array dtypes taken without a name (SGLang's int32, torch's long)


class TraceError(ValueError):
    """A bad routing trace; ``sample``, ``layer`` (HF layer index) and ``row`` say where (None: all of them)."""

    def __init__(self, sample: Any, message: str, *, layer: int | None = None, row: int | None = None) -> None:
        self.sample, self.layer, self.row = sample, layer, row
        where = f"sample {sample}, {'all layers' if layer is None else f'layer {layer}'}, "
        where += "all rows" if row is None else f"row {row}"
        super().__init__(f"routed_experts of {where}: {message}")


@dataclass(frozen=True)
class TraceSpec:
    """The model a trace belongs to: ``moe_layers`` are the HF indices of the MoE layers (dense ones are dropped)."""

    num_hf_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    topk: int

    def __post_init__(self) -> None:
        layers = tuple(int(i) for i in self.moe_layers)
        object.__setattr__(self, "moe_layers", layers)
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"topk {self.topk} must be in [1, num_experts={self.num_experts}]")
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= self.num_hf_layers:
            raise ValueError(f"moe_layers {layers} must be increasing HF indices in [0, {self.num_hf_layers})")
        if self.num_experts > 65535:
            raise ValueError(f"num_experts {self.num_experts} > 65535 does not fit the uint16 storage")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @classmethod
    def from_layer_pattern(cls, pattern: Sequence[int], num_experts: int, topk: int) -> "TraceSpec":
        """``pattern`` [num_hf_layers]: 1 where the layer is MoE (Megatron's ``moe_layer_freq`` list)."""
        return cls(len(pattern), tuple(i for i, flag in enumerate(pattern) if flag), int(num_experts), int(topk))

    @classmethod
    def from_transformer_config(cls, config: Any) -> "TraceSpec":
        """From a Megatron TransformerConfig (read by attribute: num_layers, moe_layer_freq, experts, topk)."""
        freq = config.moe_layer_freq
        pattern = freq if isinstance(freq, (list, tuple)) else [int(i % freq == 0) for i in range(config.num_layers)]
        return cls.from_layer_pattern(pattern, config.num_moe_experts, config.moe_router_topk)


@dataclass(frozen=True)
class TracePart:
    """One request's ``routed_experts``: base64 str/bytes, ndarray or tensor; ``dtype`` names a narrower width."""

    data: Any
    start_len: int = 0
    dtype: str | None = None

    @classmethod
    def from_meta_info(cls, meta_info: Mapping[str, Any], start_len: int = 0) -> "TracePart":
        """From an SGLang response's meta_info (``start_len`` is the request's routed_experts_start_len)."""
        return cls(meta_info["routed_experts"], start_len, meta_info.get("routed_experts_dtype"))


@dataclass(frozen=True)
class SampleRouting:
    """The routing of one sample of ``num_tokens`` = prompt + completion tokens, in one or more parts."""

    parts: tuple[TracePart, ...]
    num_tokens: int


@dataclass(frozen=True)
class PackedTrace:
    """All samples' MoE routing: ids [Σ rows_i, num_moe_layers, topk] uint8|uint16, sample i = rows
    [offsets[i], offsets[i+1]); rows_i = n_i − 1 (SGLang) or n_i (recorded for every token). Code
    ``spec.num_experts`` marks a missing (row, layer)."""

    ids: np.ndarray
    offsets: np.ndarray  # [S + 1] int64
    spec: TraceSpec

    @property
    def rows(self) -> np.ndarray:
        """[S] int64 rows per sample."""
        return np.diff(self.offsets)

    @property
    def num_samples(self) -> int:
        return int(self.offsets.size - 1)

    def sample(self, i: int) -> np.ndarray:
        """[rows_i, num_moe_layers, topk] view of sample i."""
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def select(self, samples: Sequence[int]) -> "PackedTrace":
        """The trace of ``samples`` (e.g. one micro-batch), concatenated in that order."""
        pieces = [self.sample(int(i)) for i in samples]
        offsets = np.zeros(len(pieces) + 1, np.int64)
        np.cumsum([len(p) for p in pieces], out=offsets[1:])
        ids = np.concatenate(pieces) if pieces else self.ids[:0]
        return PackedTrace(ids, offsets, self.spec)


def storage_dtype(num_experts: int, allow_missing: bool) -> np.dtype:
    """uint8 if every code fits (ids < E, plus the missing code E when allowed), else uint16."""
    top = num_experts if allow_missing else num_experts - 1
    return np.dtype(np.uint8) if top <= np.iinfo(np.uint8).max else np.dtype(np.uint16)


# ------------------------------------------------------------------------------------------------------ decoding
def _as_numpy(data: Any) -> Any:
    if hasattr(data, "detach") and hasattr(data, "numpy"):  # torch.Tensor, without importing torch
        return data.detach().cpu().numpy()
    return data


def _named_dtype(name: str | None, sample: Any) -> np.dtype | None:
    if name is None:
        return None
    if str(name) not in NAMED_DTYPES:
        raise TraceError(sample, f"wrong dtype: {name!r} is not one of {NAMED_DTYPES}")
    return np.dtype(str(name)).newbyteorder("<")


def _flat_from_text(part: TracePart, sample: Any, expected_rows: int | None, per_row: int) -> np.ndarray:
    dtype = _named_dtype(part.dtype, sample) or np.dtype("<i4")
    try:
        raw = base64.b64decode(part.data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise TraceError(sample, f"malformed base64 ({err})") from err
    if not raw:
        return np.zeros(0, dtype)
    if expected_rows and len(raw) % (per_row * dtype.itemsize):  # not whole rows: maybe another width was sent
        for name in NAMED_DTYPES:
            if len(raw) == expected_rows * per_row * np.dtype(name).itemsize:
                raise TraceError(sample, f"wrong dtype: {len(raw)} bytes are {expected_rows} rows of {per_row} "
                                         f"{name} ids, not {dtype.name} (name the dtype the sender used)")
    if len(raw) % dtype.itemsize:
        raise TraceError(sample, f"wrong dtype: {len(raw)} bytes are not a whole number of {dtype.name} ids")
    return np.frombuffer(raw, dtype)


def _array(part: TracePart, sample: Any, spec: TraceSpec) -> np.ndarray:
    arr = np.asarray(_as_numpy(part.data))
    named = _named_dtype(part.dtype, sample)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TraceError(sample, f"wrong dtype: {arr.dtype} ids (expected integers)")
    if named is not None and arr.dtype != named:
        raise TraceError(sample, f"wrong dtype: a {arr.dtype} array where {named.name} was named")
    if named is None and arr.dtype.name not in UNNAMED_ARRAY_DTYPES:
        raise TraceError(sample, f"wrong dtype: a {arr.dtype} array needs its dtype named (or send int32)")
    if arr.ndim == 3 and arr.size:
        if arr.shape[1] != spec.num_hf_layers:
            raise TraceError(sample, f"wrong layer count: {arr.shape[1]} layers, the model has {spec.num_hf_layers}")
        if arr.shape[2] != spec.topk:
            raise TraceError(sample, f"wrong topk: {arr.shape[2]} ids per layer, the model routes to {spec.topk}")
    elif arr.ndim != 1 and arr.size:
        raise TraceError(sample, f"expected a flat array or [rows, layers, topk], got shape {arr.shape}")
    return arr.reshape(-1)


def _shape_rows(flat: np.ndarray, spec: TraceSpec, sample: Any, start: int, expected_rows: int | None) -> np.ndarray:
    """flat ids -> [rows, num_hf_layers, topk], diagnosing a wrong layer count / topk / row count."""
    per_row = spec.num_hf_layers * spec.topk
    whole = flat.size % per_row == 0
    if expected_rows and flat.size != expected_rows * per_row and flat.size % expected_rows == 0:
        got = flat.size // expected_rows
        alt = f" (or {flat.size // per_row} rows of a different sample length)" if whole else ""
        layers = got // spec.topk if got % spec.topk == 0 else None
        topk = got // spec.num_hf_layers if got % spec.num_hf_layers == 0 else None
        if layers and topk:
            raise TraceError(sample, f"wrong layer count or topk: {got} ids per row, the model has "
                                     f"{spec.num_hf_layers} layers x topk {spec.topk}{alt}", row=start)
        if layers:
            raise TraceError(sample, f"wrong layer count: {got} ids per row are {layers} layers of topk "
                                     f"{spec.topk}, the model has {spec.num_hf_layers} layers{alt}", row=start)
        if topk:
            raise TraceError(sample, f"wrong topk: {got} ids per row are {spec.num_hf_layers} layers of "
                                     f"{topk}, the model routes to {spec.topk}{alt}", row=start)
    if not whole:
        raise TraceError(sample, f"wrong row count: {flat.size} ids are not a whole number of rows of "
                                 f"{spec.num_hf_layers} layers x topk {spec.topk}", row=start + flat.size // per_row)
    return flat.reshape(-1, spec.num_hf_layers, spec.topk)


def decode_part(part: TracePart, spec: TraceSpec, *, sample: Any = 0, expected_rows: int | None = None) -> np.ndarray:
    """One request's trace -> [rows, num_hf_layers, topk] in its own dtype (rows checked when expected is given)."""
    per_row = spec.num_hf_layers * spec.topk
    if isinstance(part.data, (str, bytes, bytearray)):
        flat = _flat_from_text(part, sample, expected_rows, per_row)
    else:
        flat = _array(part, sample, spec)
    if flat.size == 0 and expected_rows != 0:
        raise TraceError(sample, "empty trace", row=part.start_len)
    rows = _shape_rows(flat, spec, sample, part.start_len, expected_rows)
    if expected_rows is not None and len(rows) != expected_rows:
        end = part.start_len + len(rows)
        raise TraceError(sample, f"trace for a different sample length: rows [{part.start_len}, {end}) fit a "
                                 f"sample of {end + 1} tokens, this sample has {part.start_len + expected_rows + 1}",
                         row=part.start_len + min(len(rows), expected_rows))
    return rows


def decode_sample(routing: SampleRouting, spec: TraceSpec, *, sample: Any = 0) -> np.ndarray:
    """A sample's parts -> its MoE-layer rows [n − 1, num_moe_layers, topk] in the received dtype (not validated)."""
    total = routing.num_tokens - 1
    if total < 0:
        raise TraceError(sample, f"a sample needs at least one token, got num_tokens={routing.num_tokens}")
    if not routing.parts:
        raise TraceError(sample, "empty trace: no routed_experts part")
    out: np.ndarray | None = None
    covered = 0
    last = len(routing.parts) - 1
    for j, part in enumerate(routing.parts):
        start = part.start_len
        if not isinstance(start, (int, np.integer)) or not 0 <= start <= total:
            raise TraceError(sample, f"part {j}: routed_experts_start_len {start!r} outside [0, {total}]")
        if start > covered:
            raise TraceError(sample, f"part {j} starts at row {start}: rows [{covered}, {start}) have no trace",
                             row=covered)
        rows = decode_part(part, spec, sample=sample, expected_rows=total - start if j == last else None)
        if start + len(rows) > total:
            raise TraceError(sample, f"trace for a different sample length: part {j} ends at row "
                                     f"{start + len(rows)}, this sample has {total} rows", row=total)
        if out is None:
            out = rows if start == 0 and len(rows) == total else np.zeros((total,) + rows.shape[1:], rows.dtype)
        elif rows.dtype != out.dtype:
            raise TraceError(sample, f"mixed dtypes in one sample: part {j} is {rows.dtype}, part 0 {out.dtype}")
        if out is not rows:
            out[start : start + len(rows)] = rows
        covered = max(covered, start + len(rows))
    moe = list(spec.moe_layers)
    return out if len(moe) == spec.num_hf_layers else out[:, moe]


# ---------------------------------------------------------------------------------------------------- validation
def _first(mask: np.ndarray) -> tuple[int, int]:
    """(row, layer column) of the first True in a [rows, layers] mask, row-major."""
    flat = int(np.flatnonzero(mask.reshape(-1))[0])
    return divmod(flat, mask.shape[1])


def validate(ids: np.ndarray, spec: TraceSpec, *, sample: Any = 0, allow_missing: bool = False) -> np.ndarray | None:
    """Check MoE rows [R, num_moe_layers, topk]; returns the [R, num_moe_layers] missing mask (None if none).

    Rules: ids in [0, E); k distinct ids per (row, layer); no MoE layer all zeros (k ≥ 2: a layer the rollout
    never captured); −1 only as a whole missing (row, layer) and only with ``allow_missing``.
    """
    if ids.ndim != 3 or ids.shape[1] != spec.num_moe_layers:
        got = ids.shape[1] if ids.ndim == 3 else ids.shape
        raise TraceError(sample, f"wrong layer count: {got} MoE layers, the model has {spec.num_moe_layers}")
    if ids.shape[2] != spec.topk:
        raise TraceError(sample, f"wrong topk: {ids.shape[2]} ids per layer, the model routes to {spec.topk}")
    layer = spec.moe_layers

    def fail(mask: np.ndarray, what: str) -> None:
        r, c = _first(mask)
        raise TraceError(sample, f"{what} (ids {ids[r, c].tolist()})", layer=layer[c], row=r)

    if spec.topk >= 2 and len(ids):
        zero = ~(ids != 0).any(axis=(0, 2))
        if zero.any():
            c = int(np.argmax(zero))
            raise TraceError(sample, f"all ids are 0 in all {len(ids)} rows: this MoE layer was not captured "
                                     "(e.g. by another rollout pipeline stage)", layer=layer[c])
    missing = None
    if np.issubdtype(ids.dtype, np.signedinteger):
        negative = ids < 0
        if allow_missing:
            missing = (ids == -1).all(axis=2)
            negative &= ~missing[:, :, None]
            missing = missing if missing.any() else None
        if negative.any():
            fail(negative.any(axis=2), "negative id")
    if (ids >= spec.num_experts).any():
        fail((ids >= spec.num_experts).any(axis=2), f"id >= num_experts {spec.num_experts}")
    ordered = np.sort(ids, axis=2)
    duplicate = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2)
    if missing is not None:
        duplicate &= ~missing
    if duplicate.any():
        fail(duplicate, f"duplicate ids: a row needs {spec.topk} distinct experts")
    return missing


def pack(
    samples: Sequence[np.ndarray],
    spec: TraceSpec,
    *,
    allow_missing: bool = False,
    sample_ids: Sequence[Any] | None = None,
) -> PackedTrace:
    """Validate MoE rows [rows_i, num_moe_layers, topk] per sample and store them packed in the narrowest dtype."""
    names = list(range(len(samples))) if sample_ids is None else list(sample_ids)
    arrays = [np.asarray(_as_numpy(s)) for s in samples]
    for i, arr in enumerate(arrays):
        if arr.dtype != arrays[0].dtype:
            raise TraceError(names[i], f"mixed dtypes in one batch: {arr.dtype} here, {arrays[0].dtype} in "
                                       f"sample {names[0]}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TraceError(names[i], f"wrong dtype: {arr.dtype} ids (expected integers)")
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    dtype = storage_dtype(spec.num_experts, allow_missing)
    ids = np.empty((int(offsets[-1]), spec.num_moe_layers, spec.topk), dtype)
    for i, arr in enumerate(arrays):
        missing = validate(arr, spec, sample=names[i], allow_missing=allow_missing)
        out = ids[offsets[i] : offsets[i + 1]]
        out[...] = arr
        if missing is not None:
            out[missing] = spec.num_experts
    return PackedTrace(ids, offsets, spec)


def decode_batch(
    samples: Sequence[SampleRouting],
    spec: TraceSpec,
    *,
    allow_missing: bool = False,
    sample_ids: Sequence[Any] | None = None,
) -> PackedTrace:
    """SGLang traces of a batch -> one validated :class:`PackedTrace` (rows_i = n_i − 1)."""
    names = list(range(len(samples))) if sample_ids is None else list(sample_ids)
    decoded = [decode_sample(s, spec, sample=names[i]) for i, s in enumerate(samples)]
    return pack(decoded, spec, allow_missing=allow_missing, sample_ids=names)
