"""Per-step metrics: one line on stdout, JSONL, TensorBoard (when installed) and W&B (when installed and asked).

``--tensorboard-dir D``: the event files and ``metrics.jsonl`` go to D (every step, every metric, ``timing/*`` and
``throughput/*`` included)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

SHOWN = ("reward_mean", "loss", "response_len_mean", "entropy", "grad_norm", "vespo/w_seq_mean", "vespo/phi_mean",
         "routing_replay/differ_frac", "policy_lag")
TIMED = ("rollout", "reward", "pack", "old_logp", "update", "weight_sync", "step")


class MetricsLogger:
    def __init__(self, log_dir: Optional[str], wandb_project: Optional[str] = None, config: Optional[dict] = None):
        self.jsonl = self.tb = self.wandb = None
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(log_dir) / "metrics.jsonl", "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(log_dir))
            except ImportError:
                self.tb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError("--wandb-project needs the wandb package (pip install wandb)") from err
            self.wandb = wandb.init(project=wandb_project, config=config or {})

    @staticmethod
    def line(step: int, metrics: dict[str, float]) -> str:
        keys = [k for k in SHOWN if k in metrics] + [k for k in metrics if k.startswith("eval/")
                                                     and k.endswith(("/mean_reward", "/pass@1"))]
        shown = " ".join(f"{k.split('/')[-1] if k.startswith('vespo/') else k}={metrics[k]:.4g}" for k in keys)
        times = " ".join(f"{k}={metrics[f'timing/{k}']:.2f}" for k in TIMED if f"timing/{k}" in metrics)
        speed = (f" | {metrics['throughput/tokens_per_s']:.0f} tok/s {metrics['throughput/samples_per_s']:.2f} "
                 "samples/s" if "throughput/tokens_per_s" in metrics else "")
        return f"step {step:4d} | {shown}" + (f" | s: {times}{speed}" if times else "")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
