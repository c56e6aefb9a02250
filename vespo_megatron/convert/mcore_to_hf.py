"""Megatron-Core torch_dist checkpoint -> HF checkpoint directory (sharded safetensors + index json + config.json).

The HF config comes from ``SRC/hf/`` (kept there by hf-to-mcore) or ``hf_config``. Layer keys may be per-layer or
stacked, of the local or the Transformer Engine layer spec (both detected). Each output shard holds part of one unit
(never more than ``max_shard_bytes`` unless a single tensor is larger), is built from its Megatron regions only, and
is written atomically and journaled. Every HF tensor is a set of rows of one Megatron region (:func:`mapping.hf_rows`),
so a region stored raw in one chunk and kept in its dtype is copied file to file by the kernel, byte range by byte
range; any other region is read, cast and split. Vocabulary padding is stripped; dtypes are kept unless ``dtype`` is
given. Checkpoint keys outside the model (``optimizer.…`` and other non-model state of a training checkpoint) are
skipped.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import math

import torch

from vespo_megatron.convert import mapping
from vespo_megatron.convert.dcp_io import DcpCheckpoint
from vespo_megatron.convert.errors import ConversionError
from vespo_megatron.convert.hf_io import INDEX, OutTensor, index_json, shard_name, write_safetensors
from vespo_megatron.convert.hf_to_mcore import ASSETS_DIR, cast, target_dtype
from vespo_megatron.convert.journal import Journal, atomic_write, atomic_write_bytes, source_fingerprint
from vespo_megatron.convert.plan import Plan, PlannedFile, progress
from vespo_megatron.convert.spec import TRANSFORMER_IMPLS as IMPLS, ModelSpec, load_hf_config, model_spec

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class McoreToHfOptions:
    hf_config: Path | None = None  # HF config dir or config.json (default: SRC/hf)
    dtype: torch.dtype | None = None  # None keeps each tensor's dtype
    max_shard_bytes: int = 4 << 30
    emit_tied_lm_head: bool = False  # also write lm_head.weight when the embeddings are tied
    resume: bool = False
    dry_run: bool = False
    progress: bool = True
    fsync: bool = False


def checkpoint_spec(ckpt: DcpCheckpoint, hf_config) -> tuple[ModelSpec, list[str]]:
    """The spec of ``ckpt`` (stacked or per-layer keys, local or TE norm keys, its padded vocabulary) checked key by
    key; the skipped keys."""
    where = ckpt.dir / ".metadata"
    stacked = not any(key.startswith("decoder.layers.0.") for key in ckpt.tensors)
    keys = {key for key in ckpt.tensors if key.startswith(MODEL_PREFIXES)}
    # the layer spec whose key set is the checkpoint's (the closest one, whose differences are reported below)
    spec = min((model_spec(hf_config, stacked=stacked, transformer_impl=impl, config_file=where) for impl in IMPLS),
               key=lambda s: len(keys.symmetric_difference(mapping.global_shapes(s))))
    emb = ckpt.tensors.get("embedding.word_embeddings.weight")
    if emb is None:
        raise ConversionError("missing tensor", file=where, tensor="embedding.word_embeddings.weight")
    if emb[0][0] < spec.vocab_size:
        raise ConversionError(f"has {emb[0][0]} rows, fewer than the config's vocab_size {spec.vocab_size}", file=where,
                              tensor="embedding.word_embeddings.weight")
    spec = dataclasses.replace(spec, padded_vocab_size=emb[0][0])
    expected = mapping.global_shapes(spec)
    skipped = sorted(key for key in ckpt.tensors if not key.startswith(MODEL_PREFIXES))
    for key, (shape, dtype) in sorted(ckpt.tensors.items()):
        if key.startswith(MODEL_PREFIXES) and key not in expected:
            raise ConversionError("unexpected tensor (not part of this model's config)", file=where, tensor=key)
    for key, shape in expected.items():
        if key not in ckpt.tensors:
            raise ConversionError("missing tensor", file=where, tensor=key)
        found, dtype = ckpt.tensors[key]
        if found != shape:
            raise ConversionError(f"global shape {list(found)} does not match the config's {list(shape)}", file=where, tensor=key)
        if dtype not in FLOATS:
            raise ConversionError(f"dtype {dtype} is not a floating-point type", file=where, tensor=key)
    return spec, skipped


def _hf_bytes(spec: ModelSpec, rule: mapping.Rule, ckpt: DcpCheckpoint, options: McoreToHfOptions) -> int:
    dtype = target_dtype(ckpt.tensors[rule.key][1], rule, options.dtype)
    copies = 2 if options.emit_tied_lm_head and spec.tied and rule.hf == (mapping.EMBEDDING,) else 1
    return copies * rule.hf_numel * dtype.itemsize


def shard_groups(spec: ModelSpec, sizes: dict[mapping.Rule, int], max_bytes: int) -> list[tuple[mapping.Rule, ...]]:
    """Consecutive rules of each unit grouped into shards of at most ``max_bytes`` (a lone larger rule excepted)."""
    groups: list[tuple[mapping.Rule, ...]] = []
    for unit in mapping.units(spec):
        current: list[mapping.Rule] = []
        total = 0
        for rule in unit.rules:
            if current and total + sizes[rule] > max_bytes:
                groups.append(tuple(current))
                current, total = [], 0
            current.append(rule)
            total += sizes[rule]
        groups.append(tuple(current))
    return groups


def out_tensors(spec: ModelSpec, rule: mapping.Rule, ckpt: DcpCheckpoint, options: McoreToHfOptions) -> list[OutTensor]:
    """The HF tensors of ``rule``: byte ranges of the checkpoint's file where its region is stored raw and keeps its
    dtype, else tensors read, cast and split."""
    stored = ckpt.tensors[rule.key][1]
    box = (1,) * len(rule.index) + rule.shape
    located = ckpt.locate(rule.key, rule.offset, box) if target_dtype(stored, rule, options.dtype) == stored else None
    if located is None:
        region = cast(ckpt.read(rule.key, rule.index, rule.shape), rule, options.dtype)
        return [OutTensor(name, t.dtype, tuple(t.shape), data=t)
                for name, t in mapping.to_hf(spec, rule, region, options.emit_tied_lm_head)]
    path, start = located
    row = stored.itemsize * math.prod(rule.shape[1:])
    return [OutTensor(name, stored, shape, ranges=tuple((path, start + a * row, (b - a) * row) for a, b in ranges))
            for name, shape, ranges in mapping.hf_rows(spec, rule, options.emit_tied_lm_head)]


def _assets(options: McoreToHfOptions, src: Path) -> list[Path]:
    where = Path(options.hf_config) if options.hf_config else src / ASSETS_DIR
    if where.is_file():
        return [where]
    return sorted(p for p in where.iterdir() if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX)


def convert_mcore_to_hf(src: str | Path, dst: str | Path, options: McoreToHfOptions = McoreToHfOptions()) -> Plan:
    """Convert (or with ``dry_run`` only plan) ``src`` -> ``dst``; return the plan."""
    src, dst = Path(src), Path(dst)
    ckpt = DcpCheckpoint(src)
    hf_config = load_hf_config(options.hf_config or src / ASSETS_DIR)
    spec, skipped = checkpoint_spec(ckpt, hf_config)
    sizes = {rule: _hf_bytes(spec, rule, ckpt, options) for rule in mapping.rules(spec)}
    groups = shard_groups(spec, sizes, options.max_shard_bytes)
    names = [shard_name(k + 1, len(groups)) for k in range(len(groups))]
    files = [PlannedFile(n, tuple(dict.fromkeys(r.unit for r in g)), sum(len(r.hf) for r in g), sum(sizes[r] for r in g))
             for n, g in zip(names, groups)]
    largest_region = max(r.numel * ckpt.tensors[r.key][1].itemsize for r in mapping.rules(spec))
    plan = Plan("mcore-to-hf", src, dst, f"{spec.family}, {len(ckpt.tensors)} checkpoint keys", files,
                max(f.nbytes for f in files) + 2 * largest_region)
    if skipped:
        plan.notes.append(f"skipped {len(skipped)} non-model keys (e.g. {skipped[0]})")
    fingerprint = {"direction": plan.direction, "source": source_fingerprint(ckpt.files() + _assets(options, src)),
                   "options": repr(dataclasses.replace(options, resume=False, dry_run=False, progress=False))}
    journal = Journal(dst, fingerprint, options.resume)
    if options.dry_run:
        return plan
    journal.begin(options.fsync)
    weight_map: dict[str, str] = {}
    with progress(plan.total_bytes, "mcore->hf", options.progress) as bar:
        for k, (group, name) in enumerate(zip(groups, names)):
            if journal.is_done(k):
                bar.update(files[k].nbytes)
                weight_map.update(journal.payload(k))
                continue
            tensors = [t for rule in group for t in out_tensors(spec, rule, ckpt, options)]
            atomic_write(dst / name, lambda tmp, t=tensors: write_safetensors(tmp, t, bar.update), journal.tmp, options.fsync)
            journal.mark(k, {t.name: name for t in tensors}, options.fsync)
            weight_map.update({t.name: name for t in tensors})
            del tensors
    write = lambda path, data: atomic_write_bytes(path, data, journal.tmp, options.fsync)  # noqa: E731
    for asset in _assets(options, src):
        if asset.name == "config.json" and options.dtype is not None:
            hf_config.dtype = options.dtype
            write(dst / "config.json", hf_config.to_json_string().encode())
        else:
            atomic_write(dst / asset.name, lambda tmp, a=asset: shutil.copyfile(a, tmp), journal.tmp, options.fsync)
    write(dst / INDEX, index_json(weight_map, plan.total_bytes).encode())
    journal.finish()
    return plan
