"""Staleness grid on the reverse task (responses of 9–49 tokens): losses × N × mode × seeds, the paper's batch design.

The paper's design: the mini-batch is fixed (here ``--mini-prompts`` prompts × ``--samples`` samples) and a step
rolls out N mini-batches, then takes N optimizer steps (the k-th on data k updates stale). Every run here makes the
same number of optimizer updates ``--updates`` (so N = 4 takes updates/4 steps, N = 64 takes updates/64): every
cell sees the same data and the same number of updates; only the staleness differs. (The paper runs the same number
of steps instead, i.e. N times as much data and as many updates at larger N; out of this machine's budget.)
Modes: ``sync`` (μ = the trainer's recomputed π_old) and ``async`` (rollouts up to ``--max-lag`` versions behind,
μ = the bf16 engine's log-probs: staleness + engine mismatch).

Per run (one record of the results JSON): final_reward = mean reward of the held-out eval set (``--eval-prompts``
prompts × 2 samples, the run's sampling settings) after the last update; first_batch_reward and length_first = mean
reward and response length of the first step's rollouts (the policy before any update; 8 sequences at N = 4);
length_last = the final eval's mean response length; entropy_last = the last step's token entropy; collapsed =
final_reward below the start model's held-out reward (8 samples per prompt, computed once) by more than
``--collapse-margin``; curves (eval reward / length by update, per-step train metrics).

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python experiments/lengthgrid.py      # see experiments/README.md
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from lengthruns import prepare, start_eval
from runs import command_line, load_cached, mean_std, run_many, save_results

HERE = Path(__file__).resolve().parent
PAPER = {"grpo": {4: 54.0, 16: 51.1, 64: 48.6}, "gspo": {4: 59.9, 16: 58.3, 64: 47.6},
         "sapo": {4: 65.2, 16: 50.5, 64: 16.5}, "vespo": {4: 70.0, 16: 67.3, 64: 61.8}}
EVAL = "eval/heldout/"
START_SAMPLES = 8  # samples per held-out prompt for the start model's reward


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--losses", nargs="+", default=["vespo", "grpo", "gspo", "sapo", "vespo-lin", "vespo-sqrt"])
    p.add_argument("--n", type=int, nargs="+", default=[4, 16, 64], help="mini-batches per step (staleness N)")
    p.add_argument("--modes", nargs="+", default=["sync"], choices=["sync", "async"])
    p.add_argument("--max-lag", type=int, default=1, help="async: policy versions a rollout may lag")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mini-prompts", type=int, default=2, help="prompts per mini-batch (fixed for every N)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (one GRPO group)")
    p.add_argument("--updates", type=int, default=64, help="optimizer updates per run (a multiple of every N)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--sft-steps", type=int, default=1000, help="supervised warm-up steps of the starting model")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the starting model (shared by every run)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=32, help="updates between held-out evaluations")
    p.add_argument("--collapse-margin", type=float, default=0.15,
                   help="collapsed: final reward below the start model's by more than this (about 3 standard errors)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vespo-experiments/reverse"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="length_staleness")
    p.add_argument("--report-only", action="store_true", help="tables from the cached runs only; train nothing")
    return p.parse_args(argv)


def spec(args: argparse.Namespace, loss: str, n: int, mode: str, seed: int) -> dict[str, Any]:
    """The run spec of one cell and seed (lengthruns.py)."""
    steps = args.updates // n
    config = dict(loss=loss, num_mini_batches=n, rollout_batch_size=args.mini_prompts * n,
                  n_samples_per_prompt=args.samples, micro_batch_size=args.samples * args.mini_prompts,
                  max_new_tokens=args.max_new_tokens, lr=args.lr, train_iters=steps,
                  eval_interval=max(1, args.eval_every // n), n_samples_per_eval_prompt=2,
                  async_rollout=mode == "async", max_lag=args.max_lag)
    return {"task": "reverse", "seed": seed, "init_seed": args.init_seed, "sft_steps": args.sft_steps,
            "eval_prompts": args.eval_prompts,
            "probe": False, "config": config}


def run_name(loss: str, n: int, mode: str, seed: int) -> str:
    return f"{loss}-N{n}-{mode}-seed{seed}"


def record(result: dict[str, Any], loss: str, n: int, mode: str, seed: int, start: float,
           margin: float) -> dict[str, Any]:
    """The run record of the results JSON (``start``: the start model's held-out reward)."""
    rows = result["rows"]
    evals = [(r["step"] + 1, r) for r in rows if EVAL + "mean_reward" in r]
    final = evals[-1][1]
    final_reward = final[EVAL + "mean_reward"]
    return {
        "loss": loss, "n": n, "mode": mode, "seed": seed, "final_reward": final_reward,
        "final_exact": final[EVAL + "pass@1"],
        "collapsed": bool(not math.isfinite(final_reward) or final_reward < start - margin),
        "entropy_last": rows[-1]["entropy"], "length_first": rows[0]["response_len_mean"],
        "length_last": final[EVAL + "response_len"], "first_batch_reward": rows[0]["reward_mean"], "steps": len(rows),
        "updates": len(rows) * n, "wall_s": result["wall_s"],
        "curves": {"eval_update": [s * n for s, _ in evals],
                   "eval_reward": [round(r[EVAL + "mean_reward"], 5) for _, r in evals],
                   "eval_len": [round(r[EVAL + "response_len"], 3) for _, r in evals],
                   **{key: [round(r[key], 5) for r in rows if key in r]
                      for key in ("reward_mean", "response_len_mean", "entropy", "grad_norm", "vespo/phi_mean")}},
    }


def _ms(values: list[float], spec_: str = ".3f") -> str:
    mean, std = mean_std(values)
    return f"{mean:{spec_}} ± {std:{spec_.lstrip('+')}}" if len(values) > 1 else f"{mean:{spec_}}"


def markdown(records: list[dict], args: argparse.Namespace, command: str, start: dict[str, float]) -> str:
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["loss"], r["n"], r["mode"]), []).append(r)
    head = " | ".join(f"N={n}" for n in args.n)
    lines = [
        "# Staleness on the reverse task (responses 9–49 tokens), tiny Qwen3-MoE after a supervised warm-up", "",
        f"Command (from the repository root): `{command}`", "",
        f"Design: mini-batch fixed at {args.mini_prompts} prompts × {args.samples} samples; every run makes "
        f"{args.updates} optimizer updates (N = 4: {args.updates // 4} steps of 4 updates; N = 64: "
        f"{args.updates // 64} steps of 64); lr {args.lr}; warm-up {args.sft_steps} supervised steps; seeds "
        f"{args.seeds}; cells are mean ± std over seeds.", "",
        f"final reward = held-out eval ({args.eval_prompts} prompts × 2 samples, standard error about 0.05) after "
        "the last update; reward in [0, 1.5] (1.0 = every position right, +0.5 exact with the stop token). The start "
        f"model on the same prompts ({START_SAMPLES} samples each): reward {start['mean_reward']:.3f} ± "
        f"{start['reward_se']:.3f} (s.e.), response length {start['response_len']:.1f} tokens. drop = N=4 minus "
        f"N=64 (per seed, then mean ± std); collapsed = final reward below the start's by more than "
        f"{args.collapse_margin}.", "",
    ]
    for mode in args.modes:
        lines += [f"## {mode}: final reward", "", f"| loss | {head} | drop | collapsed runs |",
                  "|---|" + "---|" * (len(args.n) + 2)]
        for loss in args.losses:
            got = [cells.get((loss, n, mode), []) for n in args.n]
            if not any(got):
                continue
            vals = [_ms([r["final_reward"] for r in g]) if g else "–" for g in got]
            drop = "–"
            if got[0] and got[-1] and len(got[0]) == len(got[-1]):
                drop = _ms([a["final_reward"] - b["final_reward"] for a, b in
                            zip(sorted(got[0], key=lambda r: r["seed"]), sorted(got[-1], key=lambda r: r["seed"]))],
                           "+.3f")
            collapsed = " / ".join(f"{sum(r['collapsed'] for r in g)}/{len(g)}" for g in got)
            lines.append(f"| {loss} | " + " | ".join(vals) + f" | {drop} | {collapsed} |")
        lines += ["", f"## {mode}: response length (first step's rollouts → final eval; target mean 29 tokens "
                  "with the stop token) and last-step entropy", "",
                  f"| loss | {head} | entropy {' / '.join(map(str, args.n))} |", "|---|" + "---|" * (len(args.n) + 1)]
        for loss in args.losses:
            got = [cells.get((loss, n, mode), []) for n in args.n]
            if not any(got):
                continue
            lens = [f"{_ms([r['length_first'] for r in g], '.1f')} → {_ms([r['length_last'] for r in g], '.1f')}"
                    if g else "–" for g in got]
            ent = " / ".join(f"{mean_std([r['entropy_last'] for r in g])[0]:.2f}" if g else "–" for g in got)
            lines.append(f"| {loss} | " + " | ".join(lens) + f" | {ent} |")
        lines.append("")
    lines += ["## The paper (Qwen3-30B-A3B-Base, average accuracy %, synchronous)", "",
              "| loss | N=4 | N=16 | N=64 | drop |", "|---|---|---|---|---|"]
    lines += [f"| {loss} | {a[4]} | {a[16]} | {a[64]} | {a[4] - a[64]:+.1f} |" for loss, a in PAPER.items()]
    return "\n".join(lines) + "\n"


def figure(records: list[dict], args: argparse.Namespace, start: dict[str, float]):
    """Per mode: final reward vs N and final response length vs N (mean ± std over seeds, the start model dashed),
    and the seed-mean train reward per step at the smallest N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(args.modes), 3, figsize=(17, 4.8 * len(args.modes)), squeeze=False)
    for row, mode in enumerate(args.modes):
        runs = {loss: {n: [r for r in records if (r["loss"], r["n"], r["mode"]) == (loss, n, mode)] for n in args.n}
                for loss in args.losses}
        for col, (key, label, ref) in enumerate((("final_reward", "final held-out reward", "mean_reward"),
                                                 ("length_last", "final response length (tokens)", "response_len"))):
            ax = axes[row][col]
            for i, loss in enumerate(args.losses):
                pts = [(j, [r[key] for r in runs[loss][n]]) for j, n in enumerate(args.n) if runs[loss][n]]
                if pts:
                    ax.errorbar([j + 0.04 * (i - 2.5) for j, _ in pts], [np.mean(v) for _, v in pts],
                                yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for _, v in pts], marker="o",
                                capsize=3, label=loss)
            ax.axhline(start[ref], color="grey", ls="--", lw=1, label="start model")
            ax.set(xticks=range(len(args.n)), xticklabels=[str(n) for n in args.n], xlabel="N (mini-batches per step)",
                   ylabel=label, title=f"{mode}: {label} (mean ± std over seeds)")
            ax.legend(fontsize=7)
        ax = axes[row][2]
        n = args.n[0]
        for i, loss in enumerate(args.losses):
            curves = [r["curves"]["reward_mean"] for r in runs[loss][n]]
            if curves:
                width = min(map(len, curves))
                ax.plot([n * (s + 1) for s in range(width)], np.mean([c[:width] for c in curves], axis=0),
                        color=f"C{i}", label=loss)
        ax.set(xlabel="optimizer updates", ylabel="rollout batch reward (seed mean)",
               title=f"{mode}, N={n}: train reward")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main() -> int:
    args = parse_args()
    bad = [n for n in args.n if args.updates % n]
    if bad:
        raise SystemExit(f"--updates {args.updates} is not a multiple of N = {bad}")
    keys = [(loss, n, mode, seed) for seed in args.seeds for mode in args.modes for n in sorted(args.n, reverse=True)
            for loss in args.losses]
    runs = {run_name(*key): spec(args, *key) for key in keys}
    results = (load_cached(runs, args.workdir) if args.report_only
               else run_many(runs, args.workdir, args.jobs, script=HERE / "lengthruns.py", prepare=prepare))
    start = start_eval(args.workdir, args.init_seed, args.sft_steps, args.eval_prompts, START_SAMPLES,
                       args.max_new_tokens)
    records = [record(results[run_name(*key)], *key, start["mean_reward"], args.collapse_margin) for key in keys
               if run_name(*key) in results]
    command = command_line()
    text = markdown(records, args, command, start)
    print(text)
    data = {"command": command, "start_model": start, "records": records}
    save_results(args.out, args.name, data, text, figure(records, args, start))
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
