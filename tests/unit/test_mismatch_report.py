"""Mismatch report: table, JSON round-trip and PNG plots."""
import json

import numpy as np
import pytest
from matplotlib.image import imread

from vespo_megatron.metrics.mismatch import ROUTING_LAYER_KEY, MismatchSamples
from vespo_megatron.mismatch.report import TABLE_NAME, format_table, write_json, write_plots, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

COLUMNS = {
    "replay off": {"kl/k3": 1.5e-3, "prob/pearson": 0.9871, ROUTING_LAYER_KEY: [0.12, 0.3, 0.05],
                   "routing/any_layer_disagree_frac": 0.4},
    "replay on": {"kl/k3": 2.0e-4, "prob/pearson": 0.9993, ROUTING_LAYER_KEY: [0.0, 0.0, 0.0],
                  "routing/any_layer_disagree_frac": 0.0},
}


def _samples():
    rng = np.random.default_rng(0)
    return {name: MismatchSamples(rng.normal(0.0, scale, 500), rng.normal(-1.0, 10 * scale, 20))
            for name, scale in (("replay off", 0.05), ("replay on", 0.01))}


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 0 and data[:8] == PNG_MAGIC
    assert imread(path).shape[0] > 100  # decodes to a real image


def test_table_has_every_column_and_metric():
    table = format_table(COLUMNS)
    header, rule, *rows = table.splitlines()
    assert header.split()[0] == "metric" and "replay off" in header and "replay on" in header
    assert set(rule) <= {"-", " "}
    labels = [row.split()[0] for row in rows]
    assert labels == ["kl/k3", "prob/pearson", *(f"{ROUTING_LAYER_KEY}[{i}]" for i in range(3)),
                      "routing/any_layer_disagree_frac"]
    assert rows[0].split()[1:] == ["0.0015", "0.0002"]
    assert rows[3].split()[1:] == ["0.3", "0"]
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned


def test_table_marks_metrics_a_column_lacks():
    table = format_table({"a": {"x": 1.0, "y": [1.0, 2.0]}, "b": {"x": 2.0, "y": [3.0]}})
    rows = {row.split()[0]: row.split()[1:] for row in table.splitlines()[2:]}
    assert rows == {"x": ["1", "2"], "y[0]": ["1", "3"], "y[1]": ["2", "-"]}


def test_json_round_trip(tmp_path):
    path = write_json(COLUMNS, tmp_path / "out")
    assert path.parent == tmp_path / "out"
    assert json.loads(path.read_text()) == COLUMNS


def test_plots_are_valid_pngs(tmp_path):
    paths = write_plots(COLUMNS, tmp_path, _samples())
    assert [p.name for p in paths] == ["delta_hist.png", "log_w_hist.png", "routing_layers.png"]
    for path in paths:
        _assert_png(path)


def test_no_routing_and_no_samples_writes_no_plot(tmp_path):
    assert write_plots({"a": {"kl/k3": 0.1}}, tmp_path) == []


def test_report_writes_table_json_and_plots(tmp_path):
    paths = write_report(COLUMNS, tmp_path, _samples())
    assert paths[0].name == TABLE_NAME and paths[0].read_text() == format_table(COLUMNS) + "\n"
    assert json.loads(paths[1].read_text()) == COLUMNS
    assert len(paths) == 5
    for path in paths[2:]:
        _assert_png(path)


@pytest.mark.parametrize("columns, match", [
    ({}, "columns"),
    ({"replay off": {"kl/k3": "high"}}, r"column 'replay off', metric 'kl/k3'"),
    ({"replay on": {ROUTING_LAYER_KEY: [0.1, None]}}, rf"column 'replay on', metric '{ROUTING_LAYER_KEY}'"),
])
def test_bad_columns_name_the_column_and_metric(columns, match):
    with pytest.raises(ValueError, match=match):
        format_table(columns)


def test_samples_of_an_unknown_column_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="samples: column 'replay off'"):
        write_plots({"other": {"kl/k3": 0.1}}, tmp_path, _samples())
