"""Staleness grid: final reward and response length of each policy loss at N ∈ {4, 16, 64}, sync and fully async.

Every run: one tiny random Qwen3-MoE (per ``--seeds``), RepeatTask, a global batch of 16 prompts × 4 samples = 64
(divisible by every N), split into N mini-batches, one optimizer step each (the last is N − 1 updates stale);
``--mini-batch-prompts P`` switches to the paper's design (mini-batch fixed at P prompts, N·P prompts per step).
Modes: ``sync`` (rollouts at the current policy, μ = the trainer's recomputed π_old) and ``async`` (rollouts generated
ahead, at most ``--max-lag`` versions behind, μ = the bf16 engine's log-probs: lag + engine mismatch).
Reported per run: final reward = mean reward_mean over the last ``--window`` steps; response length over the first
and the last ``--window`` steps (VESPO-lin's length growth); entropy over the last ``--window`` steps (collapse);
drop = final reward at N = 4 minus N = 64. Writes results/staleness.{json,md,png}.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/staleness.py        # about 35 minutes on 2 cores
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from runs import command_line, curves, mean_std, run_many, save_results, window_mean

HERE = Path(__file__).resolve().parent
PAPER = {  # paper v3, Qwen3-30B-A3B-Base, average accuracy by N (vespo.md)
    "grpo": {4: 54.0, 16: 51.1, 64: 48.6}, "gspo": {4: 59.9, 16: 58.3, 64: 47.6},
    "sapo": {4: 65.2, 16: 50.5, 64: 16.5}, "vespo": {4: 70.0, 16: 67.3, 64: 61.8},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--losses", nargs="+", default=["vespo", "grpo", "gspo", "sapo", "vespo-lin"])
    p.add_argument("--n", type=int, nargs="+", default=[4, 16, 64], help="mini-batches per step (staleness N)")
    p.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    p.add_argument("--max-lag", type=int, default=1, help="async: policy versions a rollout may lag")
    p.add_argument("--rollout-batch-size", type=int, default=16, help="prompts per step (the same for every N)")
    p.add_argument("--mini-batch-prompts", type=int, default=None,
                   help="the paper's design instead: a fixed mini-batch of this many prompts, N times as many per step")
    p.add_argument("--n-samples-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-iters", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; cells show the mean (± std)")
    p.add_argument("--window", type=int, default=5, help="steps averaged for the final reward / length")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vespo-experiments/staleness"),
                   help="checkpoints and cached runs (a finished run is not redone)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="staleness", help="file stem of the results")
    return p.parse_args()


def cell(loss: str, n: int, mode: str) -> str:
    return f"{loss}-N{n}-{mode}"


def rollout_prompts(args: argparse.Namespace, n: int) -> int:
    return args.mini_batch_prompts * n if args.mini_batch_prompts else args.rollout_batch_size


def run_name(args: argparse.Namespace, loss: str, n: int, mode: str, seed: int) -> str:
    return f"{cell(loss, n, mode)}-rb{rollout_prompts(args, n)}-seed{seed}"


def summarise(runs: list[dict], window: int) -> dict[str, Any]:
    """Seed means of the run summaries; final_reward_std and the per-seed final rewards beside them."""
    per_run = [{"final_reward": window_mean(r["rows"], "reward_mean", window, last=True),
                "start_reward": window_mean(r["rows"], "reward_mean", window, last=False),
                "start_len": window_mean(r["rows"], "response_len_mean", window, last=False),
                "end_len": window_mean(r["rows"], "response_len_mean", window, last=True),
                "end_entropy": window_mean(r["rows"], "entropy", window, last=True),
                "wall_s": r["wall_s"]} for r in runs]
    out: dict[str, Any] = {key: mean_std([s[key] for s in per_run])[0] for key in per_run[0]}
    out["final_reward_std"] = mean_std([s["final_reward"] for s in per_run])[1]
    out["final_reward_seeds"] = [s["final_reward"] for s in per_run]
    return out


def mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, seed mean of ``key`` per step) over runs of equal length."""
    per_seed = [curves(r["rows"]) for r in runs]
    return per_seed[0]["step"], [mean_std(values)[0] for values in zip(*(c[key] for c in per_seed))]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _reward(c: dict | None) -> str:
    if c is None:
        return "–"
    return f"{c['final_reward']:.3f}" + (f" ± {c['final_reward_std']:.3f}" if len(c["final_reward_seeds"]) > 1 else "")


def batch_design(args: argparse.Namespace) -> str:
    k = args.n_samples_per_prompt
    if args.mini_batch_prompts:
        return (f"fixed mini-batch of {args.mini_batch_prompts} prompts × {k} samples, N times as many per step "
                "(the paper's design: more staleness = more data per rollout)")
    return (f"fixed global batch of {args.rollout_batch_size} prompts × {k} samples for every N "
            f"(mini-batch = {args.rollout_batch_size * k}/N sequences)")


def markdown(cells: dict, args: argparse.Namespace, settings: dict, command: str) -> str:
    w = args.window
    head_n = " | ".join(f"N={n}" for n in args.n)
    seeds = f"seed {args.seeds[0]}" if len(args.seeds) == 1 else f"mean ± std over seeds {args.seeds}"
    lines = [
        "# Staleness: final reward by policy loss and N (synthetic RepeatTask, tiny Qwen3-MoE)", "",
        f"Command (from the repository root): `{command}`", "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + f"; async max_lag={args.max_lag}.", "",
        f"Batch design: {batch_design(args)}.", "",
        f"Final reward = mean batch reward of the last {w} of {args.train_iters} steps (reward in [0, 1.5]), {seeds}; "
        f"drop = N={args.n[0]} minus N={args.n[-1]} (positive = degrades with staleness).", "",
    ]
    for mode in args.modes:
        lines += [f"## {mode}", "", f"| loss | {head_n} | drop | end entropy ({' / '.join(map(str, args.n))}) |",
                  "|---|" + "---|" * (len(args.n) + 2)]
        for loss in args.losses:
            got = [cells.get(cell(loss, n, mode)) for n in args.n]
            drop = got[0]["final_reward"] - got[-1]["final_reward"] if got[0] and got[-1] else None
            ent = " / ".join(_fmt(c["end_entropy"] if c else None, ".2f") for c in got)
            lines.append(f"| {loss} | " + " | ".join(map(_reward, got)) + f" | {_fmt(drop, '+.3f')} | {ent} |")
        lines.append("")
    lines += ["## Response length (mean tokens, first → last "
              f"{w} steps; max_new_tokens={args.max_new_tokens})", "",
              "| loss | mode | " + head_n + " |", "|---|---|" + "---|" * len(args.n)]
    for mode in args.modes:
        for loss in args.losses:
            got = [cells.get(cell(loss, n, mode)) for n in args.n]
            lines.append(f"| {loss} | {mode} | " + " | ".join(
                f"{c['start_len']:.2f} → {c['end_len']:.2f}" if c else "–" for c in got) + " |")
    lines += ["", "## The paper (Qwen3-30B-A3B-Base, average accuracy %, synchronous)", "",
              "| loss | N=4 | N=16 | N=64 | drop |", "|---|---|---|---|---|"]
    for loss, acc in PAPER.items():
        lines.append(f"| {loss} | {acc[4]} | {acc[16]} | {acc[64]} | {acc[4] - acc[64]:+.1f} |")
    return "\n".join(lines) + "\n"


def figure(cells: dict, grouped: dict, args: argparse.Namespace):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(args.modes), figsize=(6 * len(args.modes), 8), squeeze=False)
    for col, mode in enumerate(args.modes):
        ax = axes[0][col]
        for loss in args.losses:
            got = [(i, cells[cell(loss, n, mode)]) for i, n in enumerate(args.n) if cell(loss, n, mode) in cells]
            if got:
                ax.errorbar([i for i, _ in got], [c["final_reward"] for _, c in got],
                            yerr=[c["final_reward_std"] for _, c in got], marker="o", capsize=3, label=loss)
        ax.set(xticks=range(len(args.n)), xticklabels=[str(n) for n in args.n], xlabel="N (mini-batches per step)",
               ylabel=f"final reward (last {args.window} steps)", title=f"{mode}: final reward vs staleness")
        ax.legend()
        ax = axes[1][col]
        for loss in ("vespo", "vespo-lin"):
            for i, n in enumerate(args.n):
                if cell(loss, n, mode) in grouped:
                    ax.plot(*mean_curve(grouped[cell(loss, n, mode)], "response_len_mean"), color=f"C{i}",
                            ls="-" if loss == "vespo" else "--", label=f"{loss} N={n}")
        ax.set(xlabel="step", ylabel="mean response length (tokens)", title=f"{mode}: VESPO vs VESPO-lin length")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> int:
    args = parse_args()
    settings = dict(n_samples_per_prompt=args.n_samples_per_prompt, micro_batch_size=4,
                    max_new_tokens=args.max_new_tokens, lr=args.lr, train_iters=args.train_iters)
    grid = [(loss, n, mode) for mode in args.modes for n in sorted(args.n, reverse=True) for loss in args.losses]
    runs = {run_name(args, *key, seed): {**settings, "rollout_batch_size": rollout_prompts(args, key[1]), "seed": seed,
                                         "loss": key[0], "num_mini_batches": key[1],
                                         "async_rollout": key[2] == "async", "max_lag": args.max_lag}
            for seed in args.seeds for key in grid}
    results = run_many(runs, args.workdir, args.jobs)
    grouped = {cell(*key): [results[run_name(args, *key, s)] for s in args.seeds if run_name(args, *key, s) in results]
               for key in grid}
    grouped = {name: group for name, group in grouped.items() if group}
    cells = {name: summarise(group, args.window) for name, group in grouped.items()}
    command = command_line()
    data = {"command": command, "settings": settings, "seeds": args.seeds, "max_lag": args.max_lag,
            "window": args.window, "cells": cells, "curves": {name: curves(r["rows"]) for name, r in results.items()}}
    text = markdown(cells, args, settings, command)
    print(text)
    save_results(args.out, args.name, data, text, figure(cells, grouped, args))
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
