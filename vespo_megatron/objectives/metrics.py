"""VESPO and sequence-level policy-loss metrics, as plain floats with stable names (pure torch).

Inputs are global per-sequence vectors [num_seqs] (already summed over context-parallel ranks), so every rank
reports the same values. ``active`` [num_seqs] selects the sequences that count: at least one response token, all
log-probs finite, kept by MIS. Names follow the official code (FloyedShen/VESPO) where it has the metric:

- actor/approx_kl = mean_i(−Σ_t m·lr_t / T_i) (clamped token lr, no TIS, no sequence clamp); actor/entropy = token
  mean of the entropy over active sequences (when given).
- vespo/w_seq_{mean,max,min,std} (std unbiased, 0 below two sequences), vespo/log_w_seq_{mean,max,min} (after the
  clamp, TIS included), vespo/phi_{mean,max,min}; by strict sign of the sequence advantage:
  vespo/{w_seq,phi}_{pos,neg}_mean, vespo/n_{pos,neg}_seq; for A < 0 and W > 100: vespo/neg_noise_{count,max_w,
  phi_mean}; vespo/ess = 1 / mean((W / mean W)²) ∈ (0, 1]; the kernel parameters vespo/{k,lambda}_{pos,neg};
  vespo/tis_enabled and vespo/seq_log_tis_{mean,max,min}, vespo/seq_tis_{mean,max} (exp of the clamped Σ log ρ).
Statistics over an empty selection are 0.
"""
from __future__ import annotations

import torch
from torch import Tensor

NEGATIVE_NOISE_W = 100.0  # W above which a negative-advantage sequence is counted as noise
LOG_CLAMP = 20.0
_TIS_NAMES = ("vespo/seq_log_tis_mean", "vespo/seq_log_tis_max", "vespo/seq_log_tis_min", "vespo/seq_tis_mean",
              "vespo/seq_tis_max")


def effective_sample_size(weights: Tensor) -> Tensor:
    """ESS fraction 1 / mean((w / mean w)²) of weights [n] (0-d tensor; 0 when n = 0 or all weights are 0)."""
    w = weights.to(torch.float64)
    if w.numel() == 0 or not bool(w.mean() > 0):
        return w.new_zeros(())
    return 1.0 / ((w / w.mean()) ** 2).mean()


def sequence_metrics(
    seq_log_ratio: Tensor,
    response_counts: Tensor,
    seq_valid: Tensor,
    seq_kept: Tensor,
    seq_entropy: Tensor | None = None,
) -> dict[str, float]:
    """Metrics every policy loss reports: approx-KL, entropy, counts of active / invalid / MIS-dropped sequences."""
    present = response_counts > 0
    active = present & seq_valid & seq_kept
    counts = response_counts.to(torch.float64)
    values: dict[str, Tensor | float] = {
        "actor/approx_kl": _mean(-seq_log_ratio.to(torch.float64)[active] / counts[active]),
        "objective/n_active_seq": active.sum(),
        "objective/n_invalid_seq": (present & ~seq_valid).sum(),
        "objective/n_mis_dropped_seq": (present & seq_valid & ~seq_kept).sum(),
    }
    if seq_entropy is not None:
        tokens = counts[active].sum()
        values["actor/entropy"] = seq_entropy.to(torch.float64)[active].sum() / tokens.clamp(min=1)
    return to_floats(values)


def vespo_metrics(
    log_w: Tensor,
    w: Tensor,
    phi: Tensor,
    seq_advantages: Tensor,
    active: Tensor,
    kernel_params: tuple[float, float, float, float],
    seq_log_tis: Tensor | None = None,
) -> dict[str, float]:
    """VESPO metrics from logW, W, φ [num_seqs] of the active sequences; kernel_params = (c1+, c2+, c1−, c2−)."""
    log_w, w, phi = (x.detach().to(torch.float64)[active] for x in (log_w, w, phi))
    adv = seq_advantages.detach()[active]
    values: dict[str, Tensor | float] = {}
    values.update(_stats("vespo/w_seq", w, ("mean", "max", "min", "std")))
    values.update(_stats("vespo/log_w_seq", log_w, ("mean", "max", "min")))
    values.update(_stats("vespo/phi", phi, ("mean", "max", "min")))
    values["vespo/ess"] = effective_sample_size(w)
    for sign, selected in (("pos", adv > 0), ("neg", adv < 0)):
        values[f"vespo/w_seq_{sign}_mean"] = _mean(w[selected])
        values[f"vespo/phi_{sign}_mean"] = _mean(phi[selected])
        values[f"vespo/n_{sign}_seq"] = selected.sum()
    noise = (adv < 0) & (w > NEGATIVE_NOISE_W)
    values["vespo/neg_noise_count"] = noise.sum()
    values["vespo/neg_noise_max_w"] = _reduce(w[noise], "max")
    values["vespo/neg_noise_phi_mean"] = _mean(phi[noise])
    for name, value in zip(("k_pos", "lambda_pos", "k_neg", "lambda_neg"), kernel_params):
        values[f"vespo/{name}"] = float(value)
    values["vespo/tis_enabled"] = float(seq_log_tis is not None)
    if seq_log_tis is None:  # reported as zeros, like the official code
        values.update(dict.fromkeys(_TIS_NAMES, 0.0))
    else:
        log_tis = seq_log_tis.detach().to(torch.float64)[active]
        values.update(_stats("vespo/seq_log_tis", log_tis, ("mean", "max", "min")))
        values.update(_stats("vespo/seq_tis", torch.exp(log_tis.clamp(-LOG_CLAMP, LOG_CLAMP)), ("mean", "max")))
    return to_floats(values)


def to_floats(values: dict[str, Tensor | float]) -> dict[str, float]:
    """Convert 0-d tensors and numbers to Python floats with a single device synchronisation."""
    tensor_keys = [k for k, v in values.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    if tensor_keys:
        stacked = torch.stack([values[k].detach().to(torch.float64).reshape(()) for k in tensor_keys])  # type: ignore
        out.update(zip(tensor_keys, stacked.tolist()))
    return {k: out[k] for k in values}


def _stats(prefix: str, x: Tensor, which: tuple[str, ...]) -> dict[str, Tensor]:
    return {f"{prefix}_{name}": _reduce(x, name) for name in which}


def _reduce(x: Tensor, how: str) -> Tensor:
    if x.numel() == 0 or (how == "std" and x.numel() < 2):
        return x.new_zeros(())
    return {"mean": torch.mean, "max": torch.amax, "min": torch.amin, "std": torch.std}[how](x)


def _mean(x: Tensor) -> Tensor:
    return _reduce(x, "mean")
