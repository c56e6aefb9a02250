"""Training runs of the synthetic RepeatTask on a tiny random Qwen3-MoE, run in parallel subprocesses, and the
summaries the experiments report.

A run: a tiny Qwen3-MoE (vocab 32, hidden 64, 4 layers, 8 experts top-2) initialised with ``torch.manual_seed(seed)``
and written by ``save_pretrained``; then ``run_training(TrainConfig(**overrides), world_size=1)`` with the CPU rollout
engine (bf16) started in-process. Each run is one subprocess (``python runs.py OVERRIDES_JSON OUT_JSON``) so runs
can go side by side (``jobs``) and a finished run is never redone: its rows are cached as ``<workdir>/<name>.json``.
Rows are plain dicts {"step": it, metric: value} (JSON as they are).
Summaries: ``window_mean(rows, key, k, last)`` = mean of ``key`` over the first (or last) ``k`` rows.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

VOCAB = 32
Rows = list[dict[str, float]]


def make_checkpoint(root: Path, seed: int) -> Path:
    """The tiny random HF checkpoint of ``seed`` under ``root`` (built once, reused by later runs)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vespo_megatron.hf_config import tiny_hf_config

    path = Path(root) / f"hf-seed{seed}"
    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(tiny_hf_config("qwen3_moe", vocab_size=VOCAB)).save_pretrained(path)
    return path


def train(checkpoint_root: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """One run in this process (``overrides`` must name the seed): {"config": overrides, "wall_s": s, "rows": [...]}."""
    from vespo_megatron.train.config import TrainConfig
    from vespo_megatron.train.run import run_training

    cfg = TrainConfig(hf_checkpoint=str(make_checkpoint(checkpoint_root, overrides["seed"])), **overrides)
    start = time.time()
    history = run_training(cfg, world_size=1, quiet=True)
    return {"config": overrides, "wall_s": time.time() - start,
            "rows": [{"step": it, **metrics} for it, metrics in history]}


def run_many(runs: dict[str, dict[str, Any]], workdir: Path, jobs: int, script: Path | None = None,
             prepare: Callable[[dict[str, Any], Path], Any] | None = None) -> dict[str, dict[str, Any]]:
    """Run every {name: overrides} not cached in ``workdir`` (``jobs`` subprocesses at a time); returns all results.

    Each run is ``python script OVERRIDES_JSON OUT_JSON WORKDIR`` (default: this file, one ``train``);
    ``prepare(overrides, workdir)`` makes a run's checkpoint before the subprocesses start (they would race to write
    it; default: the random model of its seed). A cache file counts only if it was made with the same overrides
    (otherwise the run is redone). A run that fails leaves no cache file; its stderr tail is printed and the others
    go on. Progress on stdout.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    for overrides in runs.values():
        (prepare or (lambda o, root: make_checkpoint(root, o["seed"])))(overrides, workdir)
    todo = [name for name in runs if _cached(workdir / f"{name}.json", runs[name]) is None]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs cached in {workdir}; running {len(todo)} with {jobs} jobs",
          flush=True)
    start = time.time()

    def one(name: str) -> None:
        out = workdir / f"{name}.json"
        proc = subprocess.run([sys.executable, str(script or __file__), json.dumps(runs[name]), str(out), str(workdir)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"[{time.time() - start:6.0f} s] {name} FAILED:\n{proc.stderr[-3000:]}", flush=True)
            return
        result = json.loads(out.read_text())
        first, last = (window_mean(result["rows"], "reward_mean", 3, last=end) for end in (False, True))
        print(f"[{time.time() - start:6.0f} s] {name}: {result['wall_s']:.0f} s, reward {first:.3f} -> {last:.3f}",
              flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))
    return load_cached(runs, workdir)


def load_cached(runs: dict[str, dict[str, Any]], workdir: Path) -> dict[str, dict[str, Any]]:
    """The results of the runs already cached in ``workdir`` (made with the same overrides); runs nothing."""
    results = {name: _cached(workdir / f"{name}.json", overrides) for name, overrides in runs.items()}
    return {name: result for name, result in results.items() if result is not None}


def _cached(path: Path, overrides: dict[str, Any]) -> dict[str, Any] | None:
    """The result stored at ``path`` if it was made with ``overrides``, else None."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result["config"] == overrides else None


KEPT = ("reward_mean", "response_len_mean", "entropy", "loss", "grad_norm", "policy_lag", "vespo/phi_mean",
        "vespo/w_seq_mean", "vespo/log_w_seq_min", "vespo/ess")


def curves(rows: Rows) -> dict[str, list[float]]:
    """{metric: [value per step]} for the metrics in KEPT that the run logged, to 5 significant digits."""
    out = {key: [float(f"{r[key]:.5g}") for r in rows] for key in KEPT if rows and key in rows[0]}
    return {"step": [r["step"] for r in rows], **out}


def command_line() -> str:
    """The command that regenerates this script's results, as run from the repository root."""
    script = Path(sys.argv[0]).resolve().relative_to(Path(__file__).resolve().parent.parent)
    return " ".join(["OMP_NUM_THREADS=1", ".venv/bin/python", str(script), *sys.argv[1:]])


def save_results(out_dir: Path, stem: str, data: dict[str, Any], markdown: str, figure: Any) -> None:
    """``stem``.json, ``stem``.md and ``stem``.png under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = re.sub(r"\[([^\[\]{}]*)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", json.dumps(data, indent=1))
    (out_dir / f"{stem}.json").write_text(text + "\n")  # lists of numbers on one line each
    (out_dir / f"{stem}.md").write_text(markdown)
    figure.savefig(out_dir / f"{stem}.png", dpi=110, bbox_inches="tight")
    print(f"wrote {out_dir / stem}.{{json,md,png}}", flush=True)


def window_mean(rows: Rows, key: str, k: int, last: bool) -> float:
    """Mean of ``key`` over the last (``last``) or first ``k`` rows; missing and NaN values are skipped."""
    window = rows[-k:] if last else rows[:k]
    values = [r[key] for r in window if key in r and not math.isnan(r[key])]
    return sum(values) / len(values) if values else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


if __name__ == "__main__":  # one run: python runs.py OVERRIDES_JSON OUT_JSON CHECKPOINT_ROOT
    result = train(Path(sys.argv[3]), json.loads(sys.argv[1]))
    partial = Path(sys.argv[2] + ".partial")
    partial.write_text(json.dumps(result))
    partial.rename(sys.argv[2])  # the cache file appears only complete
