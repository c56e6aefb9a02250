"""The plan of a conversion (output files, bytes, peak-memory estimate) as printed by ``--dry-run``, and the progress bar.

Peak memory estimates, independent of the number of layers: HF -> Megatron writes tensor by tensor, so about the
largest tensor re-layout (its sources and its result); Megatron -> HF holds at most one output shard (when its tensors
are cast or read from chunks that are not stored raw; kernel-copied byte ranges take no memory) plus the largest
region being read and split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm


@dataclass(frozen=True)
class PlannedFile:
    name: str
    units: tuple[str, ...]  # conversion units (layers) whose tensors it holds
    tensors: int
    nbytes: int


@dataclass
class Plan:
    direction: str
    source: Path
    dest: Path
    model: str  # one-line model description
    files: list[PlannedFile]
    peak_bytes: int
    notes: list[str] = field(default_factory=list)

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
        lines.append(f"peak memory estimate: {human(self.peak_bytes)}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def progress(total: int, desc: str, enabled: bool) -> tqdm:
    """A bytes progress bar (rate shown in B/s)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, dynamic_ncols=True)
