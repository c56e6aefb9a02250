"""VESPO in verl's own policy-loss registry (written against verl 0.9.1's ``verl.trainer.ppo.core_algos``).

Importing this module registers ``vespo``, ``vespo-lin`` and ``vespo-sqrt`` with ``core_algos.register_policy_loss``.
verl calls them as ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights)`` on padded [batch, response_len] tensors and gets ``(pg_loss, metrics)``: a scalar tensor that
carries the gradient of ``log_prob`` and a dict of floats. The value is ``compute_policy_loss(name, ...)`` of
``vespo_megatron.objectives`` (the official VESPO objective), with verl's aggregation conventions below.

Hyper-parameters: ``config.policy_loss.vespo.{k_pos, lambda_pos, k_neg, lambda_neg}`` (the official names and
nesting); absent keys, or ``config`` None, take the paper's values 2, 3, 3, 2. verl 0.9.1's ``PolicyLossConfig``
dataclass has no ``vespo`` field: ``VespoPolicyLossConfig`` adds it (select it with
``actor_rollout_ref.actor.policy_loss._target_=vespo_megatron.integrations.verl.VespoPolicyLossConfig``).

Aggregation follows verl's ``agg_loss`` with ``config.global_batch_info`` as verl's own losses do. With L the
per-token loss, N = batch_num_tokens, G = global_batch_size, d = dp_size (default 1) and s = loss_scale_factor
(default response_len); N and G default to this micro-batch's response tokens / sequences when d = 1:

    token-mean               Σ L / (N/d)              token-sum   Σ L · d
    seq-mean-token-sum       Σ_i Σ_t L / (G/d)        seq-mean-token-mean   Σ_i mean_t L / (G/d)
    seq-mean-token-sum-norm  Σ L / (G/d) / s          (verl divides by the sequences here; the official fork does not)

``rollout_is_weights`` [batch, response_len] (verl's rollout correction with ``rollout_is="token"``: ρ_t =
min(π_old/μ, C), detached) are folded into logW as the official VESPO code does,
logW_i = clamp(S_i + Σ_t m_t·clamp(log max(ρ_t, 1e-8), ±20), ±20): a sequence-level loss corrects the sequence weight
(as verl's geo_mean does) where verl's token-level losses multiply each token's loss by ρ_t. The objectives take
TIS from rollout log-probs; μ'_t = logπ_old − log max(ρ_t, 1e-8) with no cap reproduces ρ_t. Weights below π_old
(IcePop zeros, batch-normalised or sequence-level weights) cannot come from token-level TIS and are rejected.

Metrics: the objectives' names (actor/approx_kl, vespo/*, objective/*) plus verl's actor/ppo_kl (token mean of
−clamp(logπ − logπ_old, ±20) over response tokens) and actor/pg_clipfrac (0: VESPO clips nothing).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from vespo_megatron.objectives import PolicyLossConfig, compute_policy_loss
from vespo_megatron.objectives.kernel import W_FLOOR  # the official floor of TIS weights: log max(ρ, 1e-8)
from vespo_megatron.objectives.packed import LOG_PROB_TOLERANCE  # rollout log-probs above this are rejected

try:
    from verl.trainer.ppo import core_algos
    from verl.workers.config import PolicyLossConfig as _VerlPolicyLossConfig
except ImportError as _err:
    raise ImportError(
        "vespo_megatron.integrations.verl needs verl (written against verl 0.9.1: pip install verl==0.9.1); "
        f"importing verl failed: {_err}"
    ) from _err

logger = logging.getLogger(__name__)

VESPO_LOSSES: tuple[str, ...] = ("vespo", "vespo-lin", "vespo-sqrt")
HPARAM_NAMES: tuple[str, ...] = ("k_pos", "lambda_pos", "k_neg", "lambda_neg")  # official config names
VERL_AGG_MODES: tuple[str, ...] = (
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
)


@dataclass
class VespoPolicyLossConfig(_VerlPolicyLossConfig):
    """verl's PolicyLossConfig plus the official ``vespo`` block {k_pos, lambda_pos, k_neg, lambda_neg}."""

    vespo: dict = field(default_factory=dict)


def vespo_hparams(config: Any) -> dict[str, float]:
    """The kernel hyper-parameters in ``config.policy_loss.vespo`` (official names), validated.

    Args:
        config: verl's actor config (dataclass, DictConfig or dict) or None.
    Returns:
        {official name: value} for the keys present (absent keys take the objectives' paper defaults).
    Raises:
        ValueError naming ``policy_loss.vespo.<key>`` for an unknown key or an out-of-range value.
    """
    block = _get(_get(config, "policy_loss"), "vespo")
    if block is None:
        return {}
    if not hasattr(block, "keys"):
        raise ValueError(f"policy_loss.vespo: expected a mapping of {', '.join(HPARAM_NAMES)}, got {block!r}")
    hparams: dict[str, float] = {}
    for key in block.keys():
        if key not in HPARAM_NAMES:
            known = ", ".join(HPARAM_NAMES)
            raise ValueError(f"policy_loss.vespo.{key}: unknown VESPO hyper-parameter; known: {known}")
        hparams[key] = block[key]
    try:
        PolicyLossConfig.from_hparams(**hparams)
    except ValueError as err:
        name = str(err).split(" ", 1)[0].rstrip(":")
        raise ValueError(f"policy_loss.vespo.{name}: {str(err).split(':', 1)[1].strip()}") from None
    return hparams


def aggregation_arguments(loss_agg_mode: str, global_batch_info: dict, response_mask: Tensor) -> dict[str, Any]:
    """``compute_policy_loss`` arguments that reproduce verl's ``agg_loss`` (see the module docstring).

    Args:
        loss_agg_mode: one of VERL_AGG_MODES.
        global_batch_info: verl's ``config.global_batch_info`` (dp_size, batch_num_tokens, global_batch_size,
            loss_scale_factor; any may be absent or None).
        response_mask: [batch, response_len] mask of the micro-batch.
    Returns:
        {"loss_agg_mode", "global_num_tokens", "global_num_seqs", "loss_scale_factor"}.
    """
    if loss_agg_mode not in VERL_AGG_MODES:
        raise ValueError(f"loss_agg_mode: unknown mode {loss_agg_mode!r}; verl's modes: {', '.join(VERL_AGG_MODES)}")
    dp = _number(global_batch_info, "dp_size") or 1
    tokens = _number(global_batch_info, "batch_num_tokens")
    seqs = _number(global_batch_info, "global_batch_size")
    scale = _number(global_batch_info, "loss_scale_factor")
    if dp > 1 and loss_agg_mode == "token-mean" and tokens is None:
        raise ValueError("global_batch_info.batch_num_tokens: required for token-mean when dp_size > 1")
    if dp > 1 and loss_agg_mode.startswith("seq-mean") and seqs is None:
        raise ValueError("global_batch_info.global_batch_size: required for seq-mean-* modes when dp_size > 1")
    out: dict[str, Any] = {"loss_agg_mode": loss_agg_mode, "global_num_tokens": None, "global_num_seqs": None,
                           "loss_scale_factor": None}
    if loss_agg_mode == "token-mean":
        out["global_num_tokens"] = None if tokens is None else tokens / dp
    elif loss_agg_mode == "token-sum":
        out.update(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=1.0 / dp)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        num_seqs = seqs / dp if seqs is not None else float((response_mask.sum(dim=-1) > 0).sum())
        out["loss_scale_factor"] = num_seqs * (scale if scale is not None else response_mask.shape[-1])
    else:
        out["global_num_seqs"] = None if seqs is None else seqs / dp
    return out


def rollout_log_prob_from_weights(old_log_prob: Tensor, weights: Tensor, response_mask: Tensor) -> Tensor:
    """μ' = logπ_old − log max(ρ, 1e-8) [batch, response_len]: the rollout log-probs whose TIS weight is ρ.

    Raises ValueError naming rollout_is_weights when a response token's weight is not finite, or so far below
    π_old that μ' > 0 (such weights are not token-level TIS weights min(π_old/μ, C)).
    """
    if not isinstance(weights, Tensor) or weights.shape != old_log_prob.shape:
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"rollout_is_weights: shape {got} differs from old_log_prob's {tuple(old_log_prob.shape)}")
    dtype = torch.promote_types(old_log_prob.dtype, torch.float32)
    old = old_log_prob.detach().to(dtype)
    rho = weights.detach().to(dtype)
    mu = old - torch.log(rho.clamp(min=W_FLOOR))
    response = response_mask.bool()
    bad = response & ~(torch.isfinite(rho) & ((mu <= LOG_PROB_TOLERANCE) | ~torch.isfinite(old)))
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"rollout_is_weights: weight {float(rho[row, col]):.6g} at row {row}, token {col} is not a token-level "
            f"TIS weight min(pi_old/mu, C) (pi_old = {math.exp(float(old[row, col])):.6g}); VESPO folds token-level "
            "weights into logW: use rollout_is='token' without batch normalisation or an IcePop lower bound"
        )
    return torch.where(response, mu, torch.zeros_like(mu))


def make_verl_policy_loss(name: str) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """The verl policy-loss function of objective ``name`` (one of VESPO_LOSSES)."""
    if name not in VESPO_LOSSES:
        raise ValueError(f"name: {name!r} is not one of {', '.join(VESPO_LOSSES)}")

    def policy_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        info = _get(config, "global_batch_info") or {}
        hparams = vespo_hparams(config)
        tis: dict[str, Any] = {}
        if rollout_is_weights is not None:
            tis = {"rollout_log_prob": rollout_log_prob_from_weights(old_log_prob, rollout_is_weights, response_mask),
                   "tis": True, "tis_cap": math.inf}
        loss, metrics = compute_policy_loss(
            name, log_prob, old_log_prob, advantages, response_mask,
            **aggregation_arguments(loss_agg_mode, info, response_mask), **tis, **hparams,
        )
        metrics.update(_verl_metrics(log_prob, old_log_prob, response_mask))
        return loss, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{name.replace('-', '_')}"
    policy_loss.__doc__ = f"verl policy loss {name!r}: see vespo_megatron.integrations.verl."
    return policy_loss


def _verl_metrics(log_prob: Tensor, old_log_prob: Tensor, response_mask: Tensor) -> dict[str, float]:
    mask = response_mask.detach().to(torch.float64)
    kl = -torch.clamp(log_prob.detach().to(torch.float64) - old_log_prob.detach().to(torch.float64), -20.0, 20.0)
    kl = torch.where(mask > 0, kl, torch.zeros_like(kl))
    return {"actor/ppo_kl": float((kl * mask).sum() / mask.sum().clamp(min=1)), "actor/pg_clipfrac": 0.0}


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` for dicts, DictConfigs and verl's dataclass configs; None when absent or obj is None."""
    if obj is None:
        return None
    if hasattr(obj, "get"):
        return obj.get(key, None)
    return getattr(obj, key, None)


def _number(info: Any, key: str) -> float | None:
    value = _get(info, key)
    if value is None:
        return None
    value = float(value.item() if isinstance(value, Tensor) else value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"global_batch_info.{key}: must be a finite number > 0, got {value!r}")
    return value


for _name in VESPO_LOSSES:
    core_algos.register_policy_loss(_name)(make_verl_policy_loss(_name))
logger.debug("registered %s in verl's policy-loss registry", ", ".join(VESPO_LOSSES))
