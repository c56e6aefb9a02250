"""The MoE train-inference mismatch table on the reverse task: grpo, grpo+TIS, grpo+R2, vespo, vespo+R2.

Every run samples from the bf16 CPU engine and trains in fp32 (the tiny Qwen3-MoE of lengthgrid.py after its
supervised warm-up, the same batch design, lr and held-out eval), synchronously at a small N, so that the
difference between the engine's log-probs μ and the trainer's is the main off-policy term:

- grpo: the PPO ratio π_θ/π_old with π_old recomputed by the trainer (the mismatch is ignored);
- grpo+tis: the same, each token weighted by min(π_old/μ, 2) (token-level truncated IS, ``tis`` loss hparam);
- grpo+r2: the same as grpo with R2 routing replay (the update replays the routing of the trainer's π_old pass);
- vespo: μ = the engine's log-probs (``--use-rollout-logprobs``), so W = Π_t π_θ/μ carries the mismatch and φ(W)
  reweights it; vespo+r2: that with R2 (the π_old pass then runs only to record the routing).

Records and the final reward as in lengthgrid.py, plus ``mismatch`` = the mean over steps of the trainer's
``mismatch/logp_abs_diff`` (token mean |logπ_old − logμ|; runs with a π_old pass only).

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python experiments/mismatchgrid.py      # see experiments/README.md
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from lengthgrid import START_SAMPLES, _ms, record, spec
from lengthruns import prepare, start_eval
from runs import command_line, load_cached, run_many, save_results

HERE = Path(__file__).resolve().parent
VARIANTS: dict[str, dict[str, Any]] = {
    "grpo": dict(loss="grpo"),
    "grpo+tis": dict(loss="grpo", hparams={"tis": True}),
    "grpo+r2": dict(loss="grpo", routing_replay="r2"),
    "vespo": dict(loss="vespo", use_rollout_logprobs=True),
    "vespo+r2": dict(loss="vespo", use_rollout_logprobs=True, routing_replay="r2"),
}
MISMATCH = "mismatch/logp_abs_diff"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lengthgrid import parse_args as grid_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--n", type=int, nargs="+", default=[4], help="mini-batches per step")
    p.add_argument("--name", default="mismatch")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vespo-experiments/reverse"))
    ours, rest = p.parse_known_args(argv)
    grid = grid_args([*rest, "--workdir", str(ours.workdir), "--name", ours.name, "--modes", "sync"])
    grid.variants, grid.n = ours.variants, ours.n
    return grid


def run_spec(args: argparse.Namespace, variant: str, n: int, seed: int) -> dict[str, Any]:
    out = spec(args, VARIANTS[variant]["loss"], n, "sync", seed)
    out["config"].update(VARIANTS[variant])
    return out


def markdown(records: list[dict], args: argparse.Namespace, command: str, start: dict[str, float]) -> str:
    lines = [
        "# Train-inference mismatch on the reverse task: bf16 engine, fp32 training (tiny Qwen3-MoE)", "",
        f"Command (from the repository root): `{command}`", "",
        f"Design: synchronous, mini-batch {args.mini_prompts} prompts × {args.samples} samples, {args.updates} "
        f"optimizer updates per run, lr {args.lr}, the lengthgrid.py start model; seeds {args.seeds}; mean ± std "
        f"over seeds. The start model's held-out reward: {start['mean_reward']:.3f} ± {start['reward_se']:.3f} "
        f"(s.e.). mismatch = token mean |logπ_old − logμ| over the run's steps (trainer fp32 vs engine bf16; '–' "
        "where no π_old pass runs).", "",
        "| variant | N | final reward | drop from start | collapsed | exact answers | final length | last-step "
        "entropy | mismatch |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in args.variants:
        for n in args.n:
            got = [r for r in records if (r["variant"], r["n"]) == (variant, n)]
            if not got:
                continue
            mism = [r["mismatch"] for r in got if r["mismatch"] is not None]
            lines.append(
                f"| {variant} | {n} | {_ms([r['final_reward'] for r in got])} | "
                f"{_ms([start['mean_reward'] - r['final_reward'] for r in got], '+.3f')} | "
                f"{sum(r['collapsed'] for r in got)}/{len(got)} | {_ms([r['final_exact'] for r in got], '.3f')} | "
                f"{_ms([r['length_last'] for r in got], '.1f')} | {np.mean([r['entropy_last'] for r in got]):.2f} | "
                f"{_ms(mism, '.4f') if mism else '–'} |")
    return "\n".join(lines) + "\n"


def figure(records: list[dict], args: argparse.Namespace, start: dict[str, float]):
    """Final reward per variant (one dot per seed, the start model dashed) and the seed-mean held-out reward curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, variant in enumerate(args.variants):
        got = [r for r in records if r["variant"] == variant and r["n"] == args.n[0]]
        axes[0].scatter([i] * len(got), [r["final_reward"] for r in got], color=f"C{i}")
        if got:
            width = min(len(r["curves"]["eval_reward"]) for r in got)
            axes[1].plot(got[0]["curves"]["eval_update"][:width],
                         np.mean([r["curves"]["eval_reward"][:width] for r in got], axis=0), marker="o",
                         color=f"C{i}", label=variant)
    for ax in axes:
        ax.axhline(start["mean_reward"], color="grey", ls="--", lw=1, label="start model")
    axes[0].set(xticks=range(len(args.variants)), xticklabels=args.variants, ylabel="final held-out reward",
                title=f"N={args.n[0]}: final reward per seed")
    axes[1].set(xlabel="optimizer updates", ylabel="held-out reward (seed mean)", title="held-out reward")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main() -> int:
    args = parse_args()
    keys = [(variant, n, seed) for seed in args.seeds for n in args.n for variant in args.variants]
    names = {key: f"mismatch-{key[0]}-N{key[1]}-seed{key[2]}" for key in keys}
    runs = {names[key]: run_spec(args, *key) for key in keys}
    results = (load_cached(runs, args.workdir) if args.report_only
               else run_many(runs, args.workdir, args.jobs, script=HERE / "lengthruns.py", prepare=prepare))
    start = start_eval(args.workdir, args.init_seed, args.sft_steps, args.eval_prompts, START_SAMPLES,
                       args.max_new_tokens)
    records = []
    for (variant, n, seed), name in names.items():
        if name not in results:
            continue
        rec = record(results[name], VARIANTS[variant]["loss"], n, "sync", seed, start["mean_reward"],
                     args.collapse_margin)
        values = [row[MISMATCH] for row in results[name]["rows"] if MISMATCH in row]
        records.append({"variant": variant, **rec, "mismatch": float(np.mean(values)) if values else None})
    command = command_line()
    text = markdown(records, args, command, start)
    print(text)
    save_results(args.out, args.name, {"command": command, "start_model": start, "records": records}, text,
                 figure(records, args, start))
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
