"""Train-inference mismatch metrics on packed, loss-masked response tokens (numpy, fp64; φ from objectives.kernel).

Inputs follow the packed convention: one entry per loss-masked response token.
- logp_train, logp_rollout [num_tokens]: logπ_train(y_t) and logμ_rollout(y_t).
- seq_ids [num_tokens] (integers): the sequence of each token. Sequences are indexed by their SORTED unique id, so
  per-sequence inputs (seq_adv [num_seqs]) are given in that order.
- experts_train, experts_rollout [num_tokens, num_moe_layers, topk] (optional, integers): the routed top-k experts.

Δ_t = logπ_train − logμ_rollout, r_t = exp(Δ_t). Every metric is a float under a stable "group/name" key (kl/k3,
ppl/ratio, vespo/log_w_p50, ...); the per-layer routing disagreement (ROUTING_LAYER_KEY) is a list. Undefined values
(the Pearson correlation when one side is constant) are NaN.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from vespo_megatron.objectives.config import PolicyLossConfig
from vespo_megatron.objectives.kernel import phi, sign_parameters

LOG_RATIO_CLAMP = 20.0  # ±clamp of token and sequence log-ratios, as the VESPO and rollout-correction code do
EXTREME_TAUS = (2, 5)  # F(τ) thresholds
LOG_W_QUANTILES = (5, 25, 50, 75, 95)  # percentiles of the sequence logW
PHI_SMALL = 0.01  # a sequence with φ < PHI_SMALL barely contributes to the VESPO gradient

ROUTING_LAYER_KEY = "routing/layer_disagree_frac"

PhiFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class MismatchSamples(NamedTuple):
    """Raw values behind the distribution plots: delta [num_tokens] (Δ_t) and log_w [num_seqs] (VESPO logW)."""

    delta: np.ndarray
    log_w: np.ndarray


class _Tokens(NamedTuple):
    logp_train: np.ndarray  # [num_tokens]
    logp_rollout: np.ndarray  # [num_tokens]
    delta: np.ndarray  # [num_tokens]
    seq_index: np.ndarray  # [num_tokens], 0 .. num_seqs-1 in sorted-id order
    num_seqs: int


def default_phi(log_w: np.ndarray, seq_adv: np.ndarray) -> np.ndarray:
    """The project's VESPO kernel (objectives.kernel) with the default (c1, c2) of PolicyLossConfig, by the sign of A.

    φ(W) = W^c1·exp(c2·(1 − W)), W = exp(logW), power term on max(W, 1e-8). log_w, seq_adv: [num_seqs] -> φ [num_seqs].
    """
    cfg = PolicyLossConfig()
    c1, c2 = sign_parameters(torch.as_tensor(seq_adv, dtype=torch.float64), cfg.c1_pos, cfg.c2_pos, cfg.c1_neg,
                             cfg.c2_neg)
    return phi(torch.as_tensor(log_w, dtype=torch.float64), c1, c2)[1].numpy()


def _finite_vector(name: str, values: object, length: int | None = None) -> np.ndarray:
    """Validate a non-empty, finite, real 1-D array (of the given length if any) and return it as fp64."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name}: expected shape [{length}], got {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] is not finite ({arr[bad[0]]}); {bad.size} such entries")
    return arr


def _int_array(name: str, values: object, ndim: int) -> np.ndarray:
    """Validate an integer array of the given rank."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integers, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    return arr


def _tokens(logp_train: object, logp_rollout: object, seq_ids: object) -> _Tokens:
    """Validate the per-token inputs and index the sequences."""
    train = _finite_vector("logp_train", logp_train)
    rollout = _finite_vector("logp_rollout", logp_rollout, train.shape[0])
    ids = _int_array("seq_ids", seq_ids, 1)
    if ids.shape[0] != train.shape[0]:
        raise ValueError(f"seq_ids: expected shape [{train.shape[0]}], got {ids.shape}")
    unique, seq_index = np.unique(ids, return_inverse=True)
    return _Tokens(train, rollout, train - rollout, seq_index, unique.size)


def _seq_sum(tok: _Tokens, values: np.ndarray) -> np.ndarray:
    """Σ_t values over the tokens of each sequence: [num_tokens] -> [num_seqs]."""
    return np.bincount(tok.seq_index, weights=values, minlength=tok.num_seqs)


def _seq_mean(tok: _Tokens, values: np.ndarray) -> np.ndarray:
    """mean_t values over the tokens of each sequence: [num_tokens] -> [num_seqs]."""
    return _seq_sum(tok, values) / np.bincount(tok.seq_index, minlength=tok.num_seqs)


def _vespo_log_w(tok: _Tokens) -> np.ndarray:
    """VESPO logW_i = clamp(Σ_t clamp(Δ_t, ±20), ±20): [num_seqs]."""
    clamped = np.clip(tok.delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return np.clip(_seq_sum(tok, clamped), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def mismatch_samples(logp_train: object, logp_rollout: object, seq_ids: object) -> MismatchSamples:
    """Δ [num_tokens] and VESPO logW [num_seqs] (sorted-id order) for the distribution plots."""
    tok = _tokens(logp_train, logp_rollout, seq_ids)
    return MismatchSamples(tok.delta, _vespo_log_w(tok))


def _log_ratio_metrics(delta: np.ndarray) -> dict[str, float]:
    """KL estimators, |Δ| statistics, F(τ), token_mult_prob_error and token χ² from Δ [num_tokens]."""
    abs_delta = np.abs(delta)
    r_clamped = np.exp(np.clip(delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return {
        "kl/k1": float(np.mean(-delta)),
        "kl/k2": float(np.mean(0.5 * delta**2)),
        "kl/k3": float(np.mean(np.expm1(delta) - delta)),
        "logp/abs_diff_mean": float(np.mean(abs_delta)),
        "logp/abs_diff_max": float(np.max(abs_delta)),
        "logp/sq_diff_mean": float(np.mean(delta**2)),
        **{f"logp/extreme_frac_tau{tau}": float(np.mean(abs_delta > math.log(tau))) for tau in EXTREME_TAUS},
        "logp/token_mult_prob_error": float(np.mean(np.exp(abs_delta))),
        "chi2/token": float(np.mean(r_clamped**2) - 1.0),
    }


def _prob_metrics(tok: _Tokens) -> dict[str, float]:
    """|p − q| mean/max/std (population) and Pearson correlation of p = exp(logπ), q = exp(logμ)."""
    p, q = np.exp(tok.logp_train), np.exp(tok.logp_rollout)
    abs_diff = np.abs(p - q)
    p_dev, q_dev = p - p.mean(), q - q.mean()
    norm = math.sqrt(float(np.sum(p_dev**2) * np.sum(q_dev**2)))
    return {
        "prob/abs_diff_mean": float(np.mean(abs_diff)),
        "prob/abs_diff_max": float(np.max(abs_diff)),
        "prob/abs_diff_std": float(np.std(abs_diff)),
        "prob/pearson": float(np.sum(p_dev * q_dev) / norm) if norm > 0 else math.nan,
    }


def _sequence_metrics(tok: _Tokens) -> dict[str, float]:
    """Log-perplexities, their difference and ratio, sequence χ² and ESS.

    log_ppl_x = mean_i(−mean_t logp_x); log_ppl_diff = log_ppl_train − log_ppl_rollout; ppl ratio =
    mean_i exp(log_ppl_train_i − log_ppl_rollout_i). With ρ_i = exp(clamp(Σ_t Δ_t, ±20)): χ²_seq = mean(ρ²) − 1 and
    ESS = 1 / mean((ρ/mean ρ)²) = (Σρ)² / (num_seqs·Σρ²) ∈ [1/num_seqs, 1].
    """
    log_ppl_train = -_seq_mean(tok, tok.logp_train)
    log_ppl_rollout = -_seq_mean(tok, tok.logp_rollout)
    log_ppl_diff = log_ppl_train - log_ppl_rollout
    log_rho = np.clip(_seq_sum(tok, tok.delta), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    rel = np.exp(log_rho - log_rho.max())  # ρ up to a common factor, which ESS does not see
    return {
        "ppl/log_ppl_train": float(np.mean(log_ppl_train)),
        "ppl/log_ppl_rollout": float(np.mean(log_ppl_rollout)),
        "ppl/log_ppl_diff": float(np.mean(log_ppl_diff)),
        "ppl/ratio": float(np.mean(np.exp(log_ppl_diff))),
        "chi2/seq": float(np.mean(np.exp(2.0 * log_rho)) - 1.0),
        "seq/ess": float(np.sum(rel) ** 2 / (tok.num_seqs * np.sum(rel**2))),
    }


def _phi_small_frac(phi_fn: PhiFn, log_w: np.ndarray, seq_adv: np.ndarray) -> float:
    """Fraction of sequences with φ < PHI_SMALL, checking what phi_fn returns."""
    phi = np.asarray(phi_fn(log_w, seq_adv), dtype=np.float64)
    if phi.shape != log_w.shape:
        raise ValueError(f"phi_fn: expected shape {log_w.shape}, got {phi.shape}")
    return float(np.mean(phi < PHI_SMALL))


def _log_w_metrics(log_w: np.ndarray, seq_adv: np.ndarray | None, phi_fn: PhiFn) -> dict[str, float]:
    """Distribution of logW [num_seqs] and the fraction of sequences whose φ < 0.01.

    phi_small_frac_pos / _neg treat every sequence as A ≥ 0 / A < 0 (advantages need not be known); phi_small_frac
    uses the given seq_adv [num_seqs] and is present only then.
    """
    out = {"vespo/log_w_mean": float(np.mean(log_w)), "vespo/log_w_min": float(np.min(log_w)),
           "vespo/log_w_max": float(np.max(log_w))}
    for pct, value in zip(LOG_W_QUANTILES, np.percentile(log_w, LOG_W_QUANTILES)):
        out[f"vespo/log_w_p{pct:02d}"] = float(value)
    ones = np.ones_like(log_w)
    out["vespo/phi_small_frac_pos"] = _phi_small_frac(phi_fn, log_w, ones)
    out["vespo/phi_small_frac_neg"] = _phi_small_frac(phi_fn, log_w, -ones)
    if seq_adv is not None:
        out["vespo/phi_small_frac"] = _phi_small_frac(phi_fn, log_w, seq_adv)
    return out


def _expert_sets(name: str, experts: object) -> np.ndarray:
    """Validate expert ids [num_tokens, num_moe_layers, topk] (non-empty, ≥ 0, no repeat in a row); sort each row."""
    arr = _int_array(name, experts, 3)
    if 0 in arr.shape:
        raise ValueError(f"{name}: expected non-empty [num_tokens, num_moe_layers, topk], got {arr.shape}")
    rows = np.sort(arr, axis=-1)
    bad = np.argwhere((rows[..., 0] < 0) | np.any(rows[..., 1:] == rows[..., :-1], axis=-1))
    if bad.size:
        token, layer = bad[0]
        raise ValueError(f"{name}: row {token}, layer {layer} is not a set of expert ids: {arr[token, layer].tolist()}")
    return rows


def routing_disagreement(
    experts_train: object, experts_rollout: object, num_tokens: int | None = None
) -> dict[str, float | list[float]]:
    """Top-k SET disagreement between two routings [num_tokens, num_moe_layers, topk] (order in a row ignored).

    d[t, l] = 1[set(train[t, l]) ≠ set(rollout[t, l])]. Returns ROUTING_LAYER_KEY: mean_t d[:, l] per layer (list),
    routing/any_layer_disagree_frac: mean_t max_l d, routing/mean_layers_disagree: mean_t Σ_l d.
    """
    train = _expert_sets("experts_train", experts_train)
    rollout = _expert_sets("experts_rollout", experts_rollout)
    if num_tokens is not None and train.shape[0] != num_tokens:
        raise ValueError(f"experts_train: expected {num_tokens} rows (num_tokens), got shape {train.shape}")
    if train.shape != rollout.shape:
        raise ValueError(f"experts_rollout: shape {rollout.shape} differs from experts_train {train.shape}")
    differs = np.any(train != rollout, axis=-1)  # [num_tokens, num_moe_layers]
    return {
        ROUTING_LAYER_KEY: [float(x) for x in differs.mean(axis=0)],
        "routing/any_layer_disagree_frac": float(np.mean(differs.any(axis=1))),
        "routing/mean_layers_disagree": float(np.mean(differs.sum(axis=1))),
    }


def mismatch_metrics(
    logp_train: object,
    logp_rollout: object,
    seq_ids: object,
    *,
    experts_train: object | None = None,
    experts_rollout: object | None = None,
    seq_adv: object | None = None,
    phi_fn: PhiFn = default_phi,
) -> dict[str, float | list[float]]:
    """Every train-inference mismatch metric of one run, as a flat dict (see the module docstring for shapes).

    Routing metrics need both expert arrays (their first dimension is num_tokens); seq_adv [num_seqs] (sorted-id
    order) adds vespo/phi_small_frac; phi_fn(logW [num_seqs], seq_adv [num_seqs]) -> φ [num_seqs] is the kernel.
    """
    tok = _tokens(logp_train, logp_rollout, seq_ids)
    if (experts_train is None) != (experts_rollout is None):
        missing = "experts_train" if experts_train is None else "experts_rollout"
        raise ValueError(f"{missing}: routing metrics need both experts_train and experts_rollout")
    routing = {} if experts_train is None else routing_disagreement(experts_train, experts_rollout, tok.delta.size)
    adv = None if seq_adv is None else _finite_vector("seq_adv", seq_adv, tok.num_seqs)
    out: dict[str, float | list[float]] = {"count/tokens": float(tok.delta.size), "count/seqs": float(tok.num_seqs)}
    out.update(_log_ratio_metrics(tok.delta))
    out.update(_prob_metrics(tok))
    out.update(_sequence_metrics(tok))
    out.update(_log_w_metrics(_vespo_log_w(tok), adv, phi_fn))
    out.update(routing)
    return out
