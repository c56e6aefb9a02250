"""The mismatch tool's report: metrics of several training passes (columns, e.g. "replay off" / "replay on") side by
side.

columns: {column name: metrics dict from mismatch_metrics} — each metric a float or a list of floats (per layer).
samples: {column name: MismatchSamples} — Δ [num_tokens] and logW [num_seqs] for the histograms (optional).
Outputs: a plain-text table (``mismatch.txt``), a JSON file (the columns dict itself) and PNG plots (matplotlib, Agg
canvas). The formulas are :mod:`vespo_megatron.metrics.mismatch`; the alignment :mod:`vespo_megatron.mismatch.align`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vespo_megatron.metrics.mismatch import ROUTING_LAYER_KEY, MismatchSamples, mismatch_metrics, mismatch_samples
from vespo_megatron.mismatch.align import TrainSide, align
from vespo_megatron.rollout.records import RolloutRecord
from vespo_megatron.routing.trace import TraceSpec

Metric = float | list[float]
Columns = Mapping[str, Mapping[str, Metric]]

JSON_NAME = "mismatch.json"
TABLE_NAME = "mismatch.txt"
DELTA_PLOT = "delta_hist.png"
LOG_W_PLOT = "log_w_hist.png"
ROUTING_PLOT = "routing_layers.png"


def _checked(columns: Columns) -> dict[str, dict[str, Metric]]:
    """Validate columns (non-empty; every value a real number or a list of them) into plain floats and lists."""
    if not columns:
        raise ValueError("columns: expected at least one column")
    out: dict[str, dict[str, Metric]] = {}
    for column, metrics in columns.items():
        out[column] = {}
        for name, value in metrics.items():
            is_list = isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str)
            items = list(value) if is_list else [value]
            if not all(isinstance(x, (int, float, np.integer, np.floating)) for x in items):
                raise ValueError(f"column {column!r}, metric {name!r}: expected a number or a list of numbers, "
                                 f"got {value!r}")
            floats = [float(x) for x in items]
            out[column][name] = floats if is_list else floats[0]
    return out


def _table_rows(columns: dict[str, dict[str, Metric]]) -> list[list[str]]:
    """One row per scalar metric and per list element (name[i]), in first-seen order; '-' where a column lacks it."""
    names = list(dict.fromkeys(name for metrics in columns.values() for name in metrics))
    rows = []
    for name in names:
        length = max(len(m[name]) if isinstance(m.get(name), list) else 0 for m in columns.values())
        for index in range(length) if length else [None]:
            label = name if index is None else f"{name}[{index}]"
            cells = []
            for metrics in columns.values():
                value = metrics.get(name)
                if isinstance(value, list):
                    value = value[index] if index is not None and index < len(value) else None
                cells.append("-" if value is None else f"{value:.6g}")
            rows.append([label, *cells])
    return rows


def format_table(columns: Columns) -> str:
    """Plain aligned text: a 'metric' column, then one column per run."""
    checked = _checked(columns)
    rows = [["metric", *checked], *_table_rows(checked)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(columns: Columns, out_dir: str | Path) -> Path:
    """Write the columns dict to out_dir/mismatch.json (NaN written as JSON's NaN extension) and return the path."""
    path = Path(out_dir) / JSON_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_checked(columns), indent=2) + "\n")
    return path


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _overlay_hist(path: Path, series: dict[str, np.ndarray], xlabel: str, title: str, bins: int, log_y: bool) -> Path:
    """Step histograms of each column's values on shared bins."""
    finite = np.concatenate([v[np.isfinite(v)] for v in series.values()])
    edges = np.histogram_bin_edges(finite, bins=bins)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for column, values in series.items():
        ax.hist(values, bins=edges, histtype="step", linewidth=1.5, label=f"{column} (n={values.size})")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def _routing_bars(path: Path, per_layer: dict[str, list[float]]) -> Path:
    """Grouped bars: fraction of tokens whose top-k set differs, per MoE layer, one bar per column."""
    num_layers = max(len(v) for v in per_layer.values())
    width = 0.8 / len(per_layer)
    fig = Figure(figsize=(max(6.0, 0.5 * num_layers + 2), 4))
    ax = fig.add_subplot()
    for i, (column, values) in enumerate(per_layer.items()):
        ax.bar(np.arange(len(values)) + (i - (len(per_layer) - 1) / 2) * width, values, width, label=column)
    ax.set_xticks(np.arange(num_layers))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("fraction of tokens with a different top-k set")
    ax.set_title("Routing disagreement (training vs rollout)")
    ax.legend()
    return _save(fig, path)


def write_plots(columns: Columns, out_dir: str | Path,
                samples: Mapping[str, MismatchSamples] | None = None) -> list[Path]:
    """Write the Δ and logW histograms (when samples are given) and the per-layer routing disagreement (when a
    column has ROUTING_LAYER_KEY) under out_dir; return the written paths."""
    checked = _checked(columns)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if samples:
        unknown = [c for c in samples if c not in checked]
        if unknown:
            raise ValueError(f"samples: column {unknown[0]!r} is not among the metric columns {list(checked)}")
        paths.append(_overlay_hist(out / DELTA_PLOT, {c: np.asarray(s.delta, float) for c, s in samples.items()},
                                   "Δ = logπ_train − logμ_rollout (per token)", "Per-token log-prob difference",
                                   bins=60, log_y=True))
        paths.append(_overlay_hist(out / LOG_W_PLOT, {c: np.asarray(s.log_w, float) for c, s in samples.items()},
                                   "VESPO logW = Σ_t Δ_t, clamped to ±20 (per sequence)", "Sequence log-weight",
                                   bins=30, log_y=False))
    per_layer = {c: m[ROUTING_LAYER_KEY] for c, m in checked.items() if isinstance(m.get(ROUTING_LAYER_KEY), list)}
    if per_layer:
        paths.append(_routing_bars(out / ROUTING_PLOT, per_layer))
    return paths


def write_report(columns: Columns, out_dir: str | Path,
                 samples: Mapping[str, MismatchSamples] | None = None) -> list[Path]:
    """Write the table (``mismatch.txt``), the JSON and the plots into ``out_dir``; return the written paths."""
    table = Path(out_dir) / TABLE_NAME
    json_path = write_json(columns, out_dir)  # validates the columns and creates out_dir
    table.write_text(format_table(columns) + "\n")
    return [table, json_path, *write_plots(columns, out_dir, samples)]


def column_metrics(records: Sequence[RolloutRecord], side: TrainSide,
                   spec: TraceSpec) -> tuple[dict[str, Any], MismatchSamples]:
    """Every mismatch metric of one training pass against the rollout, and the Δ / logW samples for the plots."""
    a = align(records, side, spec)
    metrics = mismatch_metrics(a.logp_train, a.logp_rollout, a.seq_ids, experts_train=a.experts_train,
                               experts_rollout=a.experts_rollout)
    return metrics, mismatch_samples(a.logp_train, a.logp_rollout, a.seq_ids)


def report(records: Sequence[RolloutRecord], sides: Mapping[str, TrainSide], spec: TraceSpec,
           output_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Metrics of each named pass (columns); with ``output_dir``, also the table, the JSON and the plots there."""
    columns, samples = {}, {}
    for name, side in sides.items():
        columns[name], samples[name] = column_metrics(records, side, spec)
    if output_dir is not None:
        write_report(columns, output_dir, samples)
    return columns
