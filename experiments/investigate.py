"""Why VESPO degraded most at N = 64 in results/staleness.md: probed re-runs of that grid's cells (repeat task).

The runs repeat staleness.md's settings (16 prompts × 4 samples per step split into N mini-batches, micro-batch 4,
6-token responses, lr 1e-3, 30 steps, seed 0) for vespo, grpo and gspo at N = 4 and N = 64, with the per-update
probe of probe.py. Reported (results/investigation.{md,json,png}):

- the kernel check: max over all updates and tokens of |w_t − φ_i| where w_t = −(∂loss/∂logπ_t)·G/A_i is the weight
  the trainer's loss really applied and φ_i the paper's kernel recomputed in numpy from the per-sequence log-ratio
  Σ_t (logπ_θ − logμ) (μ = the trainer's π_old of that very sample, sync mode); and logW of the first mini-batch of
  every step (θ = θ_old there, so it must be 0: μ is the policy that produced the sample);
- by position k of the mini-batch in its step (0 = fresh, N − 1 = most stale): mean logW, mean φ (vespo) or mean
  applied weight (grpo, gspo), share of sequences with φ < 1e-3 (vespo) or fully clipped (grpo/gspo: every token's
  weight 0), gradient norm and ‖Δθ‖ of the update;
- the one-sequence normaliser: at N = 64 each update sees one sequence (4 with the same prompt share nothing), and
  the loss is −φ·A·Σ_t logπ_t / T; ‖Δθ‖ against φ shows whether Adam cancels φ's scale;
- the entropy trajectory of every run.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python experiments/investigate.py       # 6 runs, about 25 min
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from lengthruns import prepare
from runs import command_line, run_many, save_results

HERE = Path(__file__).resolve().parent
BUCKETS = 4  # positions k of a step grouped in 4 quarters


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--losses", nargs="+", default=["vespo", "grpo", "gspo"])
    p.add_argument("--n", type=int, nargs="+", default=[4, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=["repeat", "reverse"], default="repeat",
                   help="reverse: the cells of lengthgrid.py (its default settings, sync) instead")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None,
                   help="default /tmp/vespo-experiments/investigate (repeat) or the reverse grid's work directory")
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p.parse_args()


def spec(loss: str, n: int, seed: int, task: str = "repeat") -> dict[str, Any]:
    if task == "reverse":
        import lengthgrid

        return {**lengthgrid.spec(lengthgrid.parse_args([]), loss, n, "sync", seed), "probe": True}
    config = dict(loss=loss, num_mini_batches=n, rollout_batch_size=16, n_samples_per_prompt=4, micro_batch_size=4,
                  max_new_tokens=6, lr=1e-3, train_iters=30)
    return {"task": "repeat", "seed": seed, "probe": True, "config": config}


def analyse(result: dict[str, Any], loss: str, n: int) -> dict[str, Any]:
    """Summary of one probed run (see the module docstring)."""
    updates = result["probe"]
    vespo = loss.startswith("vespo")
    out: dict[str, Any] = {"loss": loss, "n": n, "updates": len(updates)}
    if vespo:
        out["check_err_max"] = max(u.get("check_err", 0.0) for u in updates)
    first = [abs(v) for u in updates if u["k"] == 0 for v in u["log_w"]]
    out["first_minibatch_abs_log_w_max"] = max(first) if first else 0.0
    size = max(1, n // BUCKETS)
    rows = []
    for b in range(min(BUCKETS, n)):
        sel = [u for u in updates if b * size <= u["k"] < (b + 1) * size]
        log_w = np.array([v for u in sel for v in u["log_w"]])
        weight = np.array([v for u in sel for v in (u["phi"] if vespo else u["weight"])])
        zero = np.array([v for u in sel for v in u["zero_frac"]])
        dead = weight < 1e-3 if vespo else zero >= 1.0
        rows.append({"k": f"{b * size}–{(b + 1) * size - 1}", "seqs": int(log_w.size),
                     "log_w_mean": float(log_w.mean()) if log_w.size else 0.0,
                     "log_w_p10": float(np.percentile(log_w, 10)) if log_w.size else 0.0,
                     "weight_mean": float(weight.mean()) if weight.size else 0.0,
                     "dead_share": float(dead.mean()) if dead.size else 0.0,
                     "grad_norm": float(np.mean([u["grad_norm"] for u in sel])),
                     "delta_norm": float(np.mean([u["delta_norm"] for u in sel]))})
    out["by_k"] = rows
    if vespo and n >= 64:  # ‖Δθ‖ by the mean φ of the update's sequences (one sequence per update on repeat)
        pairs = [(float(np.mean(u["phi"])), u["delta_norm"], u["grad_norm"]) for u in updates if u["phi"]]
        bins = [(0, 1e-3), (1e-3, 0.1), (0.1, 0.5), (0.5, 10)]
        out["by_phi"] = [{"phi": f"[{lo:g}, {hi:g})", "updates": len(sel), "delta_norm": float(np.mean(sel[:, 1])),
                          "grad_norm": float(np.mean(sel[:, 2]))}
                         for lo, hi in bins for sel in [np.array([p for p in pairs if lo <= p[0] < hi]).reshape(-1, 3)]
                         if len(sel)]
        if len(pairs) > 1:
            out["corr_phi_delta"] = float(np.corrcoef([p[0] for p in pairs], [p[1] for p in pairs])[0, 1])
        seqs = np.array([(f, a, t) for u in updates for f, a, t in zip(u["phi"], u["adv"], u["T"])]).reshape(-1, 3)
        lengths = seqs[:, 2] if len(seqs) else np.zeros(1)
        edges = np.percentile(lengths, [0, 100 / 3, 200 / 3, 100])
        out["phi_by_length"] = [
            {"T": f"{lo:.0f}–{hi:.0f}", "seqs": int(len(sel)),
             **{key: float(np.mean(sel[test(sel[:, 1]), 0])) if test(sel[:, 1]).any() else None
                for key, test in (("pos", lambda a: a > 0), ("neg", lambda a: a < 0))}}
            for lo, hi in zip(edges[:-1], edges[1:]) for sel in [seqs[(seqs[:, 2] >= lo) & (seqs[:, 2] <= hi)]]]
        signs = {"pos": lambda a: a > 0, "neg": lambda a: a < 0}
        out["phi_by_sign"] = {key: float(np.mean([f for u in updates for f, a in zip(u["phi"], u["adv"]) if test(a)]
                                                 or [0.0])) for key, test in signs.items()}
    zero_adv = [u for u in updates if not u["adv"]]  # no sequence with A ≠ 0: no gradient at all
    out["updates_without_signal"] = len(zero_adv)
    out["entropy"] = [round(r["entropy"], 4) for r in result["rows"]]
    out["reward"] = [round(r["reward_mean"], 4) for r in result["rows"]]
    return out


def markdown(summaries: list[dict], command: str, task: str = "repeat") -> str:
    settings = ("Settings of results/staleness.md (16 prompts × 4 samples per step, micro-batch 4, 6-token responses, "
                "lr 1e-3, 30 steps, seed 0)." if task == "repeat" else
                "Settings of results/length_staleness.md (reverse task, mini-batch 2 prompts × 4 samples, 64 updates, "
                "lr 3e-4, sync).")
    lines = [f"# Investigation: per-update probe of the {task}-task staleness runs", "",
             f"Command: `{command}`", "",
             settings + " Weight = φ (vespo, the hand kernel) or the mean per-token weight the loss "
             "applied (grpo: ratio or 0 when clipped; gspo: sequence ratio or 0). dead = φ < 1e-3 (vespo) or every "
             "token's weight 0 (grpo, gspo). Only sequences with A ≠ 0.", ""]
    for s in summaries:
        head = f"## {s['loss']}, N = {s['n']} ({s['updates']} updates, {s['updates_without_signal']} with no A ≠ 0)"
        lines += [head, ""]
        if "check_err_max" in s:
            lines.append(f"- kernel check: max |w_t − φ_i| = {s['check_err_max']:.2e}")
        lines.append(f"- max |logW| in the first mini-batch of a step: {s['first_minibatch_abs_log_w_max']:.2e}")
        if "corr_phi_delta" in s:
            lines.append(f"- corr(mean φ of the update, ‖Δθ‖) = {s['corr_phi_delta']:+.3f}")
        if "phi_by_sign" in s:
            lines.append(f"- mean φ of sequences with A > 0: {s['phi_by_sign']['pos']:.3f}; A < 0: "
                         f"{s['phi_by_sign']['neg']:.3f}")
        lines += ["", "| k | seqs | mean logW | p10 logW | mean weight | dead share | grad norm | ‖Δθ‖ |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['seqs']} | {r['log_w_mean']:.3f} | {r['log_w_p10']:.3f} | {r['weight_mean']:.3f} | "
                  f"{r['dead_share']:.2f} | {r['grad_norm']:.3f} | {r['delta_norm']:.4f} |" for r in s["by_k"]]
        if "by_phi" in s:
            lines += ["", "| mean φ of the update | updates | mean ‖Δθ‖ | mean grad norm |", "|---|---|---|---|"]
            lines += [f"| {r['phi']} | {r['updates']} | {r['delta_norm']:.4f} | {r['grad_norm']:.4f} |"
                      for r in s["by_phi"]]
        ent = s["entropy"]
        if s.get("phi_by_length"):
            lines += ["", "| response tokens T | seqs | mean φ, A > 0 | mean φ, A < 0 |", "|---|---|---|---|"]
            lines += [f"| {r['T']} | {r['seqs']} | {_fmt(r['pos'])} | {_fmt(r['neg'])} |" for r in s["phi_by_length"]]
        ent, last = s["entropy"], len(s["entropy"]) - 1
        at = sorted({0, last // 4, last // 2, 3 * last // 4, last})
        lines += ["", f"- entropy at steps {'/'.join(map(str, at))}: " + " / ".join(f"{ent[i]:.3f}" for i in at),
                  f"- reward, mean of the first → last 5 steps: {np.mean(s['reward'][:5]):.3f} → "
                  f"{np.mean(s['reward'][-5:]):.3f}", ""]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def figure(summaries: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, s in enumerate(summaries):
        style = "-" if s["n"] >= 64 else "--"
        axes[0].plot(s["entropy"], style, color=f"C{i // 2}", label=f"{s['loss']} N={s['n']}")
        axes[1].plot(s["reward"], style, color=f"C{i // 2}", label=f"{s['loss']} N={s['n']}")
    axes[0].set(xlabel="step", ylabel="entropy (nats/token)", title="entropy trajectory")
    axes[1].set(xlabel="step", ylabel="batch reward", title="reward")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> int:
    args = parse_args()
    keys = [(loss, n) for n in sorted(args.n, reverse=True) for loss in args.losses]
    tag = "" if args.task == "repeat" else "-reverse-probe"
    name = {key: f"{key[0]}-N{key[1]}{tag}-seed{args.seed}" for key in keys}
    runs = {name[key]: spec(*key, args.seed, args.task) for key in keys}
    workdir = args.workdir or Path("/tmp/vespo-experiments") / ("investigate" if args.task == "repeat" else "reverse")
    results = run_many(runs, workdir, args.jobs, script=HERE / "lengthruns.py", prepare=prepare)
    summaries = [analyse(results[name[key]], *key) for key in keys if name[key] in results]
    command = command_line()
    text = markdown(summaries, command, args.task)
    print(text)
    stem = "investigation" if args.task == "repeat" else "investigation_reverse"
    save_results(args.out, stem, {"command": command, "summaries": summaries}, text, figure(summaries))
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
