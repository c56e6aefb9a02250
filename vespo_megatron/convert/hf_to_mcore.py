"""HF checkpoint directory -> Megatron-Core torch_dist checkpoint (optionally also per-rank shards), streamed by unit.

All checks (config, layout, every tensor's presence and shape, destination) run before anything is written. Then each
unit (embedding, one layer, head) is converted rule by rule into its own ``.distcp`` file, renamed into place and
journaled. A Megatron tensor kept in its sources' dtype is only their rows re-arranged, so its bytes are copied file to
file by the kernel; any other (a cast, or per-rank shards asked for) is built in memory — the rule being written and
the next one (re-laid out by a background thread) are all that is held. The HF config and the other
small files of the source (generation config, tokenizer) are kept under ``DEST/hf/`` for the way back.
Block-scaled FP8 sources (``weight`` e4m3 + ``weight_scale_inv``) are dequantized to bf16 (or ``dtype``) rule by rule.
A dry run needs only the source's config.json: every tensor is planned from the config, nothing is read or allocated.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TypeVar

import torch

from vespo_megatron.convert import dcp_io, mapping, rank_shards
from vespo_megatron.convert.hf_io import INDEX, SINGLE, HfCheckpoint
from vespo_megatron.convert.journal import Journal, atomic_write, atomic_write_bytes, source_fingerprint
from vespo_megatron.convert.plan import Plan, PlannedFile, PlannedTensor, progress
from vespo_megatron.convert.spec import Layout, ModelSpec, fp8_block, load_hf_config, model_spec

ASSETS_DIR = "hf"
log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class HfToMcoreOptions:
    layout: Layout = Layout()
    dtype: torch.dtype | None = None  # None keeps each tensor's dtype
    divisible_by: int = 128  # vocabulary padding multiple (times tp)
    per_layer_keys: bool = False  # per-layer keys even where stock Megatron-Core stacks the layers [L, …]
    transformer_impl: str = "local"  # layer spec whose keys are written: local | transformer_engine
    ignore: str | None = None  # regex of source tensors to skip (e.g. MTP layers)
    per_rank: bool = False  # also write per-rank shards for ``layout``
    resume: bool = False
    dry_run: bool = False
    progress: bool = True
    fsync: bool = False


def target_dtype(stored: torch.dtype, rule: mapping.Rule, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor stored as ``stored`` is written in: a requested dtype (None keeps it), except float32 for
    the router expert bias, as Megatron keeps it."""
    if dtype is None:
        return stored
    return torch.float32 if rule.fp32 else dtype


def cast(tensor: torch.Tensor, rule: mapping.Rule, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in its :func:`target_dtype` (itself when that is its dtype)."""
    return tensor.to(target_dtype(tensor.dtype, rule, dtype))


def raw_chunk(spec: ModelSpec, rule: mapping.Rule, ckpt: HfCheckpoint, dtype: torch.dtype | None) -> dcp_io.RawChunk | None:
    """The Megatron tensor of ``rule`` as byte ranges of the HF files (:func:`mapping.placements`), when its sources
    share one dtype that ``dtype`` keeps and none is FP8 (dequantized); else None."""
    if any(map(ckpt.quantized, rule.hf)):
        return None
    stored = {ckpt.dtype(name) for name in rule.hf}
    if len(stored) != 1 or target_dtype(next(iter(stored)), rule, dtype) not in stored:
        return None
    itemsize = next(iter(stored)).itemsize
    row = itemsize * math.prod(rule.shape[1:])
    sources = [ckpt.locate(name) for name in rule.hf]
    pieces = tuple((dst * row, sources[j][0], sources[j][1] + src * row, rows * row)
                   for j, src, dst, rows in mapping.placements(spec, rule))
    return dcp_io.RawChunk(next(iter(stored)), rule.shape, pieces)


def converted(spec: ModelSpec, unit: mapping.Unit, ckpt: HfCheckpoint, dtype: torch.dtype | None,
              raw: bool) -> Iterator[tuple[mapping.Rule, torch.Tensor | dcp_io.RawChunk]]:
    """(rule, Megatron tensor) for each rule of ``unit``, one at a time; the source files are mapped per rule only.
    With ``raw``, a tensor that is only a re-arrangement of its sources' bytes comes as a :class:`dcp_io.RawChunk`."""
    for rule in unit.rules:
        chunk = raw_chunk(spec, rule, ckpt, dtype) if raw else None
        if chunk is None:
            with ckpt.session() as session:
                chunk = cast(mapping.to_mcore(spec, rule, [session.get(name) for name in rule.hf]), rule, dtype)
        yield rule, chunk


def prefetched(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """``items`` produced by a background thread up to ``depth`` ahead, so reading and re-layout overlap the writes
    (both release the GIL in their copies); an exception in the producer is raised here."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((end, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            slots.put((end, err))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, err = slots.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _assets(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX)


def _nbytes(rule: mapping.Rule, ckpt: HfCheckpoint, dtype: torch.dtype | None) -> int:
    """Bytes of the rule's Megatron tensor."""
    if dtype is None:
        return sum(ckpt.nbytes(n) for n in rule.hf) * rule.numel // rule.hf_numel
    return rule.numel * (4 if rule.fp32 else dtype.itemsize)


def convert_hf_to_mcore(src: str | Path, dst: str | Path, options: HfToMcoreOptions = HfToMcoreOptions()) -> Plan:
    """Convert (or with ``dry_run`` only plan) ``src`` -> ``dst``; return the plan."""
    src, dst = Path(src), Path(dst)
    hf_config = load_hf_config(src)
    spec = model_spec(hf_config, tp=options.layout.tp, divisible_by=options.divisible_by,
                      stacked=False if options.per_layer_keys else None, transformer_impl=options.transformer_impl,
                      config_file=src / "config.json")
    options.layout.check(spec, src / "config.json")
    # a dry run needs only config.json: without weights, sizes come from the config's dtype (nothing is allocated)
    config_only = options.dry_run and not (src / INDEX).is_file() and not (src / SINGLE).is_file()
    ckpt = None if config_only else HfCheckpoint(src, fp8_block(hf_config, src / "config.json"))
    expected = {n: s for rule in mapping.rules(spec) for n, s in zip(rule.hf, rule.hf_shapes)}
    skip = _skipped(spec, options.ignore)
    ignored = ckpt.check(expected, skip) if ckpt else []
    config_dtype = getattr(hf_config, "dtype", None) or torch.float32
    # from the config alone: the config's dtype, float32 where Megatron keeps float32 (the router expert bias)
    want = options.dtype if ckpt else options.dtype or config_dtype
    dtype_of = lambda r: target_dtype(ckpt.dtype(r.hf[0]) if ckpt else config_dtype, r, want)  # noqa: E731
    if ckpt:
        nbytes = lambda r: _nbytes(r, ckpt, options.dtype)  # noqa: E731
    else:
        nbytes = lambda r: r.numel * dtype_of(r).itemsize  # noqa: E731
    units = mapping.units(spec)
    names = [f"__0_{k}.distcp" for k in range(len(units))]
    sizes = [sum(nbytes(r) for r in unit.rules) for unit in units]
    largest_rule = max(nbytes(r) for r in mapping.rules(spec))
    files = [PlannedFile(n, (u.name,), len(u.rules), b) for n, u, b in zip(names, units, sizes)]
    # one rule's sources and result at a time (+ one unit of per-rank slices, which are written per unit)
    # dequantizing an FP8 tensor holds it in float32 twice (values, expanded block scales)
    quantized = [r.numel for r in mapping.rules(spec) if ckpt and any(ckpt.quantized(n) for n in r.hf)]
    plan = Plan("hf-to-mcore", src, dst, _describe(spec), files, 2 * largest_rule + 8 * max(quantized, default=0)
                + (max(sizes) if options.per_rank else 0))
    if quantized:
        plan.notes.append(f"{len(quantized)} tensors from block-scaled FP8 sources, dequantized to "
                          f"{str(options.dtype or torch.bfloat16).removeprefix('torch.')}")
    if options.dry_run:
        plan.tensors = [PlannedTensor(r.key, r.index, r.shape, str(dtype_of(r)).removeprefix("torch."), nbytes(r), r.hf)
                        for r in mapping.rules(spec)]
        plan.layout, plan.ranks = str(options.layout), rank_shards.rank_nbytes(spec, options.layout, dtype_of)
    if config_only:
        plan.notes.append(f"planned from {src / 'config.json'} alone (no weights): sizes in the config's dtype "
                          f"{str(config_dtype).removeprefix('torch.')} unless --dtype (float32 expert bias)")
    if spec.mtp_layers:
        plan.notes.append(f"{spec.mtp_layers} multi-token-prediction (MTP) layer(s) model.layers.{spec.num_layers}… "
                          "not converted: skipped")
        log.warning("%s: %s", src, plan.notes[-1])
    if ignored:
        plan.notes.append(f"ignored {len(ignored)} source tensors matching {skip!r}: {', '.join(ignored[:4])}…")
    if options.per_rank:
        plan.notes.append(f"per-rank shards for {options.layout} under {rank_shards.RANKS_DIR}/")
    weights = [src / f for f in ckpt.files] if ckpt else []
    fingerprint = {"direction": plan.direction, "source": source_fingerprint(weights + _assets(src)),
                   "options": repr(dataclasses.replace(options, resume=False, dry_run=False, progress=False))}
    journal = Journal(dst, fingerprint, options.resume)
    if options.dry_run:
        return plan
    journal.begin(options.fsync)
    writers = rank_shards.RankShardWriter(spec, options.layout, dst) if options.per_rank else None
    with progress(plan.total_bytes, "hf->mcore", options.progress) as bar:
        for k, (unit, name) in enumerate(zip(units, names)):
            if journal.is_done(k):
                bar.update(sizes[k])
                continue
            chunks = prefetched(converted(spec, unit, ckpt, options.dtype, dcp_io.RAW_WRITES and not options.per_rank))
            if writers:
                chunks = writers.tee(chunks)
            pieces: list = []
            objects = [key for key in map(mapping.extra_state_key, unit.rules) if key]

            def write(tmp: Path) -> None:
                pieces.extend(dcp_io.write_data_file(tmp, _tracked(chunks, bar), objects))

            atomic_write(dst / name, write, journal.tmp, options.fsync)
            if writers:
                writers.flush(k, journal, options.fsync)
            journal.mark(k, pieces, options.fsync)
    write_bytes = lambda path, data: atomic_write_bytes(path, data, journal.tmp, options.fsync)  # noqa: E731
    (dst / ASSETS_DIR).mkdir(exist_ok=True)
    for asset in _assets(src):
        atomic_write(dst / ASSETS_DIR / asset.name, lambda tmp, a=asset: shutil.copyfile(a, tmp), journal.tmp, options.fsync)
    dcp_io.finish(dst, [(n, journal.payload(k)) for k, n in enumerate(names)], write_bytes)
    journal.finish()
    return plan


def _tracked(chunks: Iterator[tuple[mapping.Rule, torch.Tensor | dcp_io.RawChunk]], bar) -> Iterator[tuple]:
    for rule, chunk in chunks:
        yield rule.key, rule.global_shape, rule.offset, len(rule.index), chunk
        bar.update(chunk.nbytes)


def _skipped(spec: ModelSpec, ignore: str | None) -> str | None:
    """The regex of source tensors left out: ``ignore`` (``--ignore``) and the MTP layers ``model.layers.{L…}``."""
    parts = [ignore] if ignore else []
    if spec.mtp_layers:
        layers = "|".join(str(spec.num_layers + k) for k in range(spec.mtp_layers))
        parts.append(rf"model\.layers\.(?:{layers})\..*")
    return "|".join(f"(?:{part})" for part in parts) or None


def _describe(spec: ModelSpec) -> str:
    moe = sum(spec.moe_layers)
    return (f"{spec.family}: {spec.num_layers} layers ({moe} MoE), hidden {spec.hidden}, heads {spec.num_heads}/"
            f"{spec.num_kv_heads} kv{' (MLA)' if spec.mla else ''}, {spec.num_experts} experts, vocab {spec.vocab_size} -> {spec.padded_vocab_size}"
            f"{', tied embeddings' if spec.tied else ''}, {'stacked' if spec.stacked else 'per-layer'} keys"
            f" of the {spec.transformer_impl} layer spec")
