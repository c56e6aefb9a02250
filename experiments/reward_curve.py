"""Does the synthetic task's reward rise under VESPO at N = 4? One run per seed, start vs end reward.

Per seed s: a tiny random Qwen3-MoE initialised with seed s, trained with VESPO (synchronous rollouts, N = 4
mini-batches per step) on RepeatTask; start reward = mean of reward_mean over the first ``--window`` steps, end reward
= mean over the last ``--window`` steps, rise = end − start. Writes results/reward_curve.{json,md,png}.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/reward_curve.py        # about 6 minutes on 2 cores
"""
from __future__ import annotations

import argparse
from pathlib import Path

from runs import command_line, curves, mean_std, run_many, save_results, window_mean

HERE = Path(__file__).resolve().parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-mini-batches", type=int, default=4)
    p.add_argument("--rollout-batch-size", type=int, default=8)
    p.add_argument("--n-samples-per-prompt", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-iters", type=int, default=60)
    p.add_argument("--window", type=int, default=3, help="steps averaged for the start and the end reward")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vespo-experiments/reward_curve"),
                   help="checkpoints and cached runs (a finished run is not redone)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p.parse_args()


def markdown(summary: dict, settings: dict, window: int, command: str) -> str:
    lines = [
        "# Reward under VESPO at N = 4 (synthetic RepeatTask, tiny Qwen3-MoE)", "",
        f"Command (from the repository root): `{command}`", "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
        f"Start = mean reward of the first {window} steps, end = mean of the last {window} "
        "(reward in [0, 1.5]: fraction of correct symbols + 0.5 for the exact answer).", "",
        "| seed | start reward | end reward | rise | end entropy | wall (s) |", "|---|---|---|---|---|---|",
    ]
    for seed, s in summary["seeds"].items():
        lines.append(f"| {seed} | {s['start']:.3f} | {s['end']:.3f} | {s['end'] - s['start']:+.3f} | "
                     f"{s['end_entropy']:.3f} | {s['wall_s']:.0f} |")
    (ms, ss), (me, se) = summary["start"], summary["end"]
    lines += [f"| mean ± std | {ms:.3f} ± {ss:.3f} | {me:.3f} ± {se:.3f} | {me - ms:+.3f} | | |", "",
              f"Seeds whose reward rose: {summary['risen']} of {len(summary['seeds'])}.", ""]
    return "\n".join(lines)


def figure(results: dict, window: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in results.items():
        c = curves(result["rows"])
        line, = ax_r.plot(c["step"], c["reward_mean"], alpha=0.35)
        smooth = np.convolve(c["reward_mean"], np.ones(window) / window, mode="valid")
        ax_r.plot(c["step"][window - 1:], smooth, color=line.get_color(), label=f"{name} ({window}-step mean)")
        ax_e.plot(c["step"], c["entropy"], color=line.get_color(), label=name)
    ax_r.set(xlabel="step", ylabel="reward (batch mean)", title="VESPO, N = 4: reward")
    ax_e.set(xlabel="step", ylabel="entropy (nats / token)", title="policy entropy")
    ax_r.legend()
    ax_e.legend()
    return fig


def main() -> int:
    args = parse_args()
    settings = dict(loss="vespo", num_mini_batches=args.num_mini_batches, rollout_batch_size=args.rollout_batch_size,
                    n_samples_per_prompt=args.n_samples_per_prompt, micro_batch_size=4,
                    max_new_tokens=args.max_new_tokens, lr=args.lr, train_iters=args.train_iters)
    runs = {f"seed{s}": {**settings, "seed": s} for s in args.seeds}
    results = run_many(runs, args.workdir, args.jobs)
    per_seed = {}
    for name, result in results.items():
        rows = result["rows"]
        per_seed[name] = {"start": window_mean(rows, "reward_mean", args.window, last=False),
                          "end": window_mean(rows, "reward_mean", args.window, last=True),
                          "end_entropy": window_mean(rows, "entropy", args.window, last=True),
                          "wall_s": result["wall_s"], "curves": curves(rows)}
    summary = {"seeds": per_seed,
               "start": mean_std([s["start"] for s in per_seed.values()]),
               "end": mean_std([s["end"] for s in per_seed.values()]),
               "risen": sum(s["end"] > s["start"] for s in per_seed.values())}
    command = command_line()
    for name, s in per_seed.items():
        print(f"{name}: start {s['start']:.3f} -> end {s['end']:.3f} ({s['end'] - s['start']:+.3f})")
    save_results(args.out, "reward_curve", {"command": command, "settings": settings, "window": args.window, **summary},
                 markdown(summary, settings, args.window, command), figure(results, args.window))
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
