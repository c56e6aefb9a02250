"""Per-rank shards: each rank's local tensors for one TP/PP/EP layout, under the names of ``model.state_dict()``.

Layout of ``DEST/ranks/``: ``pp{p}/tp{t}/{unit}.safetensors`` holds the non-expert tensors of tensor-parallel rank t
in pipeline stage p, ``pp{p}/ep{e}_etp{x}/{unit}.safetensors`` the routed-expert tensors of expert rank e and
expert-tensor rank x (one file per conversion unit, so writing streams by layer). :func:`load_rank_state_dict` merges
the two for a rank: the result loads with ``model.load_state_dict(…, strict=False)`` (only ``_extra_state`` left out).

Local slices of a global Megatron tensor W (rank r of n):
    column / vocab: W.chunk(n, 0)[r];  row: W.chunk(n, 1)[r];  glu: [gate.chunk(n, 0)[r]; up.chunk(n, 0)[r]]
    (qkv is ``column``: the interleaved rows split into whole kv groups). Routed experts use the expert-tensor size
and keep experts ep·E/EP … (ep+1)·E/EP − 1 with local ids 0 … E/EP − 1. Layer i lives in stage i // (L/PP) as
local layer i mod (L/PP); a tied output layer on the last stage (PP > 1) is a copy of the embedding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from vespo_megatron.convert.journal import Journal, atomic_write
from vespo_megatron.convert.mapping import Rule, rules
from vespo_megatron.convert.spec import Layout, ModelSpec

RANKS_DIR = "ranks"


def local_slice(tensor: torch.Tensor, split: str, rank: int, size: int) -> torch.Tensor:
    """This rank's part of a global Megatron tensor (see the module docstring)."""
    if size == 1 or split == "replicated":
        return tensor
    if split in ("column", "vocab"):
        return tensor.chunk(size, 0)[rank]
    if split == "row":
        return tensor.chunk(size, 1)[rank]
    if split == "glu":
        gate, up = tensor.chunk(2, 0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]])
    raise ValueError(f"unknown tensor-parallel split {split!r}")


def _stages(spec: ModelSpec, layout: Layout, rule: Rule) -> list[tuple[int, int | None]]:
    """(pipeline stage, local layer) pairs holding ``rule``."""
    per_stage = spec.num_layers // layout.pp
    if rule.layer is not None:
        return [(rule.layer // per_stage, rule.layer % per_stage)]
    if rule.key.startswith("embedding."):
        return [(0, None)] + ([(layout.pp - 1, None)] if spec.tied and layout.pp > 1 else [])
    return [(layout.pp - 1, None)]


def rank_pieces(spec: ModelSpec, layout: Layout, rule: Rule, tensor: torch.Tensor) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(rank directory, local state-dict name, local tensor) for every rank holding a part of ``rule``'s tensor."""
    for stage, layer in _stages(spec, layout, rule):
        name = rule.module
        if rule.key.startswith("embedding.") and stage == layout.pp - 1 and stage > 0:
            name = "output_layer.weight"
        if rule.expert is not None:
            per_rank = spec.num_experts // layout.ep
            ep, local = divmod(rule.expert, per_rank)
            name = name.format(layer=layer, expert=local)
            for x in range(layout.expert_tp):
                yield f"pp{stage}/ep{ep}_etp{x}", name, local_slice(tensor, rule.split, x, layout.expert_tp)
        else:
            name = name.format(layer=layer)
            for t in range(layout.tp):
                yield f"pp{stage}/tp{t}", name, local_slice(tensor, rule.split, t, layout.tp)


def rank_nbytes(spec: ModelSpec, layout: Layout, dtype_of: Callable[[Rule], torch.dtype]) -> dict[str, int]:
    """Bytes of every rank directory's shards for ``layout`` (see :func:`rank_pieces`), from the shapes alone: the
    slices are taken of tensors on the meta device (``dtype_of(rule)``: the rule's written dtype)."""
    out: dict[str, int] = {}
    for rule in rules(spec):
        dtype = dtype_of(rule)
        for directory, _, local in rank_pieces(spec, layout, rule, torch.empty(rule.shape, dtype=dtype, device="meta")):
            out[directory] = out.get(directory, 0) + local.numel() * dtype.itemsize
    return dict(sorted(out.items()))


class RankShardWriter:
    """Collects one unit's local tensors per rank directory while the unit converts, then writes them atomically."""

    def __init__(self, spec: ModelSpec, layout: Layout, dest: Path) -> None:
        self.spec, self.layout, self.root = spec, layout, dest / RANKS_DIR
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def tee(self, chunks: Iterator[tuple[Rule, torch.Tensor]]) -> Iterator[tuple[Rule, torch.Tensor]]:
        for rule, tensor in chunks:
            for directory, name, local in rank_pieces(self.spec, self.layout, rule, tensor):
                self.pending.setdefault(directory, {})[name] = local.contiguous().clone()
            yield rule, tensor

    def flush(self, unit: int, journal: Journal, fsync: bool) -> None:
        for directory, tensors in sorted(self.pending.items()):
            (self.root / directory).mkdir(parents=True, exist_ok=True)
            atomic_write(self.root / directory / f"{unit:05d}.safetensors", lambda tmp, t=tensors: save_file(t, tmp),
                         journal.tmp, fsync)
        self.pending = {}


def load_rank_state_dict(dest: str | Path, tp_rank: int, pp_rank: int, ep_rank: int, etp_rank: int = 0) -> dict[str, torch.Tensor]:
    """The local state dict of one rank from the per-rank shards under ``dest``."""
    stage = Path(dest) / RANKS_DIR / f"pp{pp_rank}"
    out: dict[str, torch.Tensor] = {}
    for directory in (stage / f"tp{tp_rank}", stage / f"ep{ep_rank}_etp{etp_rank}"):
        for file in sorted(directory.glob("*.safetensors")) if directory.is_dir() else []:
            out.update(load_file(file))
    if not out:
        raise FileNotFoundError(f"{stage}: no per-rank shards for tp={tp_rank} ep={ep_rank} etp={etp_rank}")
    return out
