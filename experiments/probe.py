"""Per-update probe of a training run, installed in the training process without changing the library.

``install(num_mini_batches)`` wraps two functions the trainer calls:

- ``megatron.loss.objective`` (one call per micro-batch): from the inputs it sees — logπ_θ [t] (with grad), the μ the
  loss uses (``old_log_prob``, or the rollout log-probs in asynchronous mode), the loss mask, seq_ids, the sequence
  advantages — it recomputes S_i = Σ_t m_t·clamp(logπ_θ − logμ, ±20) per sequence and, independently of the
  library (numpy), the kernel φ_i = exp(c2 + c1·log max(W_i, 1e-8) − c2·W_i) with W_i = exp(clamp(S_i / g(T_i), ±20))
  and (c1, c2) = (2, 3) for A_i ≥ 0, (3, 2) for A_i < 0. Then it asks autograd for ∂loss/∂logπ_θ and turns it into
  the weight the loss really applied to each token: w_t = −(∂loss/∂logπ_t) · G / A_i, with G the normaliser
  (global response tokens for token-mean; global sequences · T_i for seq-mean-token-mean). For VESPO w_t must equal
  φ_i on every token of sequence i: the record keeps check_err = max_t |w_t − φ_i(t)| over the update's
  tokens. For GRPO/GSPO/SAPO w_t is the ratio (times the clip indicator) the loss applied.
- the optimizer's ``step`` (one call per mini-batch): the gradient norm it returns (before clipping) and the norm of
  the parameter change ‖Δθ‖ of that update (what Adam actually did).

``records()`` returns one dict per update: step, k (index of the mini-batch in its step, 0 = fresh), grad_norm,
delta_norm, and per sequence: log_w (product, clamped), phi (hand kernel of the run's transform), weight (mean w_t),
zero_frac (share of its tokens with |w_t| < 1e-6), adv, T; check_err (VESPO losses only).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

TRANSFORMS = {"vespo": "product", "vespo-lin": "lin", "vespo-sqrt": "sqrt"}
SEQ_MEAN = ("gspo", "sapo")  # losses aggregated seq-mean-token-mean in the official fork (and here, by default)


def hand_phi(seq_log_ratio: np.ndarray, tokens: np.ndarray, adv: np.ndarray, transform: str) -> np.ndarray:
    """φ [S] by the paper's formula in numpy, from S_i [S], T_i [S] and A_i [S]."""
    t = np.maximum(tokens, 1.0)
    scaled = {"product": seq_log_ratio, "lin": seq_log_ratio / t, "sqrt": seq_log_ratio / np.sqrt(t)}[transform]
    w = np.exp(np.clip(scaled, -20.0, 20.0))
    c1 = np.where(adv >= 0, 2.0, 3.0)
    c2 = np.where(adv >= 0, 3.0, 2.0)
    with np.errstate(over="ignore", invalid="ignore"):
        phi = np.exp(c2 + c1 * np.log(np.maximum(w, 1e-8)) - c2 * w)
    return np.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


_STATE: dict[str, Any] = {"records": [], "current": [], "updates": 0}


def records() -> list[dict[str, Any]]:
    return _STATE["records"]


def install(num_mini_batches: int) -> None:
    import torch

    import vespo_megatron.megatron.loss as loss_mod
    import vespo_megatron.train.trainer as trainer_mod

    original_objective = loss_mod.objective
    original_build = trainer_mod.build_optimizer

    def objective(logp, entropy, mb, settings, official_divisor, seq_sum):
        loss, tokens, metrics = original_objective(logp, entropy, mb, settings, official_divisor, seq_sum)
        old = mb.rollout_log_prob if settings.old_from_rollout else mb.old_log_prob
        mask = mb.loss_mask.to(torch.float64)
        if settings.old_from_rollout:
            mask = mask * mb.rollout_valid.to(torch.float64)
        lr = (logp.detach().to(torch.float64) - old.to(torch.float64)).clamp(-20, 20) * mask
        num = mb.num_seqs
        seq_lr = torch.zeros(num, dtype=torch.float64).index_add_(0, mb.seq_ids, lr).numpy()
        seq_t = torch.zeros(num, dtype=torch.float64).index_add_(0, mb.seq_ids, mask).numpy()
        adv = mb.seq_advantages.to(torch.float64).numpy()
        (grad,) = torch.autograd.grad(loss, logp, retain_graph=True)
        grad = grad.detach().to(torch.float64)
        seq_of = mb.seq_ids
        if settings.name in SEQ_MEAN:
            norm = mb.global_seqs * torch.from_numpy(seq_t)[seq_of]
        else:
            norm = torch.full_like(grad, float(mb.global_tokens))
        adv_t = torch.from_numpy(adv)[seq_of]
        live = (mask > 0) & (adv_t != 0)
        w_t = torch.where(live, -grad * norm / torch.where(live, adv_t, torch.ones_like(adv_t)), torch.zeros_like(grad))
        count = torch.zeros(num, dtype=torch.float64).index_add_(0, seq_of, live.to(torch.float64))
        w_mean = torch.zeros(num, dtype=torch.float64).index_add_(0, seq_of, w_t) / count.clamp(min=1)
        zero = torch.zeros(num, dtype=torch.float64).index_add_(0, seq_of, (live & (w_t.abs() < 1e-6)).double())
        rec = {"log_w": np.clip(seq_lr, -20, 20), "weight": w_mean.numpy(), "adv": adv, "T": seq_t,
               "zero_frac": (zero / count.clamp(min=1)).numpy(), "live": count.numpy() > 0}
        transform = TRANSFORMS.get(settings.name)
        if transform is not None:
            phi = hand_phi(seq_lr, seq_t, adv, transform)
            dev = (w_t - torch.from_numpy(phi)[seq_of]).abs() * live
            rec["phi"] = phi
            rec["check_err"] = float(dev.max()) if bool(live.any()) else 0.0
        _STATE["current"].append(rec)
        return loss, tokens, metrics

    def build_optimizer(ddp, **kwargs):
        opt = original_build(ddp, **kwargs)
        params = [p for p in ddp.parameters() if p.requires_grad]
        step = opt.step

        def probed_step():
            before = torch.cat([p.detach().flatten().to(torch.float64) for p in params])
            ok, grad_norm, zeros = step()
            after = torch.cat([p.detach().flatten().to(torch.float64) for p in params])
            u = _STATE["updates"]
            _STATE["updates"] += 1
            _STATE["records"].append(_finish(u // num_mini_batches, u % num_mini_batches, float(grad_norm),
                                             float((after - before).norm()), _STATE["current"]))
            _STATE["current"] = []
            return ok, grad_norm, zeros

        opt.step = probed_step
        return opt

    loss_mod.objective = objective
    trainer_mod.build_optimizer = build_optimizer


def _finish(step: int, k: int, grad_norm: float, delta_norm: float, micro: list[dict]) -> dict[str, Any]:
    """One update's record from its micro-batches' records (sequences with a response token and A ≠ 0 only)."""
    out: dict[str, Any] = {"step": step, "k": k, "grad_norm": grad_norm, "delta_norm": delta_norm}
    keys = ["log_w", "weight", "adv", "T", "zero_frac"] + (["phi"] if micro and "phi" in micro[0] else [])
    for key in keys:
        out[key] = [round(float(v), 6) for r in micro for v, live in zip(r[key], r["live"]) if live]
    if micro and "check_err" in micro[0]:
        out["check_err"] = max(r["check_err"] for r in micro)
    out["finite"] = all(math.isfinite(v) for v in out["weight"])
    return out
