"""The plan of a conversion (output files, bytes, peak-memory estimate) as printed by ``--dry-run``, and the progress bar.

Peak memory estimates, independent of the number of layers: HF -> Megatron writes tensor by tensor, so about the
largest tensor re-layout (its sources and its result); Megatron -> HF holds at most one output shard (when its tensors
are cast or read from chunks that are not stored raw; kernel-copied byte ranges take no memory) plus the largest
region being read and split.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm


@dataclass(frozen=True)
class PlannedFile:
    name: str
    units: tuple[str, ...]  # conversion units (layers) whose tensors it holds
    tensors: int
    nbytes: int


@dataclass(frozen=True)
class PlannedTensor:
    """One Megatron tensor of a dry run: its key, position on the key's leading axes, shape, dtype and HF sources."""

    key: str
    index: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    hf: tuple[str, ...]


@dataclass
class Plan:
    direction: str
    source: Path
    dest: Path
    model: str  # one-line model description
    files: list[PlannedFile]
    peak_bytes: int
    notes: list[str] = field(default_factory=list)
    tensors: list[PlannedTensor] = field(default_factory=list)  # every tensor (dry runs of hf-to-mcore)
    layout: str = ""  # the parallel layout of ``ranks``
    ranks: dict[str, int] = field(default_factory=dict)  # per-rank shard directory -> bytes at ``layout``

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def render(self) -> str:
        lines = [
            f"{self.direction}: {self.source} -> {self.dest}",
            f"model: {self.model}",
            f"output: {len(self.files)} data files, {sum(f.tensors for f in self.files)} tensors, {human(self.total_bytes)}",
        ]
        for f in self.files:
            units = f.units[0] if len(f.units) == 1 else f"{f.units[0]} … {f.units[-1]}"
            lines.append(f"  {f.name:<36} {units:<24} {f.tensors:>7} tensors {human(f.nbytes):>10}")
        if self.tensors:
            lines.append(f"tensors: {len(self.tensors)} Megatron tensors from "
                         f"{sum(len(t.hf) for t in self.tensors)} HF tensors (every one: --plan-json)")
        if self.ranks:
            big = max(self.ranks, key=self.ranks.__getitem__)
            lines.append(f"per-rank shards at {self.layout}: {len(self.ranks)} directories, largest {big} "
                         f"{human(self.ranks[big])}, smallest {human(min(self.ranks.values()))}")
        lines.append(f"peak memory estimate: {human(self.peak_bytes)}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


    def to_json(self) -> dict:
        """The whole plan as JSON-ready data (every tensor named, per-rank shard bytes)."""
        return {"direction": self.direction, "source": str(self.source), "dest": str(self.dest), "model": self.model,
                "total_bytes": self.total_bytes, "peak_bytes": self.peak_bytes, "notes": self.notes,
                "files": [dataclasses.asdict(f) for f in self.files],
                "tensors": [dataclasses.asdict(t) for t in self.tensors], "layout": self.layout, "ranks": self.ranks}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def progress(total: int, desc: str, enabled: bool) -> tqdm:
    """A bytes progress bar (rate shown in B/s)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, dynamic_ncols=True)
