"""Bitwise comparison of two checkpoints, tensor by tensor, streamed.

Pairs: HF vs HF (by name), Megatron vs Megatron (by key, chunk by chunk of the first), and HF vs Megatron (every
Megatron tensor converted to its HF tensors with the mapping and compared with the HF ones; the HF config is the
HF directory's). Equal means same dtype, same shape and the same bytes (so NaNs with equal bits compare equal).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vespo_megatron.convert import mapping
from vespo_megatron.convert.dcp_io import DcpCheckpoint
from vespo_megatron.convert.errors import ConversionError
from vespo_megatron.convert.hf_io import INDEX, SINGLE, HfCheckpoint
from vespo_megatron.convert.mcore_to_hf import checkpoint_spec
from vespo_megatron.convert.plan import human, progress
from vespo_megatron.convert.spec import load_hf_config


@dataclass
class VerifyReport:
    a: Path
    b: Path
    compared: int = 0
    nbytes: int = 0
    mismatched: list[str] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.only_a or self.only_b)

    def render(self) -> str:
        lines = [f"verify {self.a} vs {self.b}: {self.compared} tensors, {human(self.nbytes)} compared",
                 "result: " + ("bitwise equal" if self.ok else "DIFFERENT")]
        for title, names in (("differ", self.mismatched), (f"only in {self.a}", self.only_a), (f"only in {self.b}", self.only_b)):
            if names:
                lines.append(f"{len(names)} {title}: " + ", ".join(names[:10]) + (" …" if len(names) > 10 else ""))
        return "\n".join(lines)

    def compare(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.compared += 1
        self.nbytes += x.numel() * x.element_size()
        if not bitwise_equal(x, y):
            self.mismatched.append(name)


def bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, same shape, same bytes."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def kind(path: Path) -> str:
    if (path / "metadata.json").is_file():
        return "mcore"
    if (path / INDEX).is_file() or (path / SINGLE).is_file():
        return "hf"
    raise ConversionError("neither an HF checkpoint nor a Megatron distributed checkpoint", file=path)


def _hf_vs_hf(report: VerifyReport, a: HfCheckpoint, b: HfCheckpoint, show: bool) -> None:
    report.only_a = sorted(set(a.tensors) - set(b.tensors))
    report.only_b = sorted(set(b.tensors) - set(a.tensors))
    common = sorted(set(a.tensors) & set(b.tensors), key=lambda n: (a.tensors[n].file, n))
    with progress(sum(a.nbytes(n) for n in common), "verify", show) as bar:
        for name in common:
            with a.session() as sa, b.session() as sb:  # one tensor pair mapped at a time
                report.compare(name, sa.get(name), sb.get(name))
            bar.update(a.nbytes(name))


def _mcore_vs_mcore(report: VerifyReport, a: DcpCheckpoint, b: DcpCheckpoint) -> None:
    report.only_a = sorted(set(a.tensors) - set(b.tensors))
    report.only_b = sorted(set(b.tensors) - set(a.tensors))
    for key in sorted(set(a.tensors) & set(b.tensors)):
        if a.tensors[key] != b.tensors[key]:
            report.compared += 1
            report.mismatched.append(key)
            continue
        for offsets, sizes in a.chunks(key):
            report.compare(f"{key}@{list(offsets)}", a.read_region(key, offsets, sizes), b.read_region(key, offsets, sizes))


def _hf_vs_mcore(report: VerifyReport, hf: HfCheckpoint, ckpt: DcpCheckpoint, show: bool) -> None:
    spec, _ = checkpoint_spec(ckpt, load_hf_config(hf.dir))
    produced: set[str] = set()
    with progress(sum(hf.nbytes(n) for n in hf.tensors), "verify", show) as bar:
        for rule in mapping.rules(spec):
            with hf.session() as session:
                for name, tensor in mapping.to_hf(spec, rule, ckpt.read(rule.key, rule.index, rule.shape)):
                    produced.add(name)
                    if name in hf.tensors:
                        report.compare(name, session.get(name), tensor)
                        bar.update(hf.nbytes(name))
    report.only_a = sorted(set(hf.tensors) - produced)
    report.only_b = sorted(produced - set(hf.tensors))


def verify(a: str | Path, b: str | Path, show_progress: bool = False) -> VerifyReport:
    """Compare checkpoints ``a`` and ``b`` (each an HF directory or a torch_dist directory)."""
    a, b = Path(a), Path(b)
    report = VerifyReport(a, b)
    kinds = (kind(a), kind(b))
    if kinds == ("hf", "hf"):
        _hf_vs_hf(report, HfCheckpoint(a), HfCheckpoint(b), show_progress)
    elif kinds == ("mcore", "mcore"):
        _mcore_vs_mcore(report, DcpCheckpoint(a), DcpCheckpoint(b))
    elif kinds == ("hf", "mcore"):
        _hf_vs_mcore(report, HfCheckpoint(a), DcpCheckpoint(b), show_progress)
    else:
        swapped = VerifyReport(b, a)
        _hf_vs_mcore(swapped, HfCheckpoint(b), DcpCheckpoint(a), show_progress)
        report.compared, report.nbytes, report.mismatched = swapped.compared, swapped.nbytes, swapped.mismatched
        report.only_a, report.only_b = swapped.only_b, swapped.only_a
    return report
