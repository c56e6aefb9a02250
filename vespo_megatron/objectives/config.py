"""Hyper-parameters of the policy losses, validated once, with the official config names accepted as aliases."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

# official / verl config name -> field name here
ALIASES: dict[str, str] = {
    "k_pos": "c1_pos",
    "lambda_pos": "c2_pos",
    "k_neg": "c1_neg",
    "lambda_neg": "c2_neg",
    "clip_ratio_low": "eps_low",
    "clip_ratio_high": "eps_high",
    "clip_ratio_c": "clip_c",
}
GSPO_FORMS: tuple[str, ...] = ("token", "sequence")
KL_LOSS_TYPES: tuple[str, ...] = ("k1", "k2", "mse", "k3", "low_var_kl")  # formulas in ``regularizers``


@dataclass(frozen=True)
class PolicyLossConfig:
    """Every hyper-parameter of every loss; each loss reads the ones it needs.

    c1_pos, c2_pos, c1_neg, c2_neg: VESPO kernel exponents by advantage sign (aliases k_pos, lambda_pos, k_neg,
        lambda_neg). eps_low, eps_high: clip range [1 − eps_low, 1 + eps_high] of grpo, gspo and cispo (aliases
        clip_ratio_low/high); None takes the loss's default (grpo, cispo: 0.2/0.2; gspo: 3e-4/4e-4).
    clip_c: dual-clip bound of grpo for A < 0 (alias clip_ratio_c; None disables it). gspo_form: "token" (the fork's
        GSPO-token, default) or "sequence". tau_pos, tau_neg: SAPO gate temperatures for A > 0 and A ≤ 0.
    tis, tis_cap: token-level truncated IS with weight min(exp(clamp(logπ_old − logμ, ±20)), tis_cap).
    mis, mis_low, mis_high: sequence-level masked IS, keeping sequences with exp(clamp(Σ m·(logπ_old − logμ), ±20))
        in [mis_low, mis_high].
    """

    c1_pos: float = 2.0
    c2_pos: float = 3.0
    c1_neg: float = 3.0
    c2_neg: float = 2.0
    eps_low: float | None = None
    eps_high: float | None = None
    clip_c: float | None = 3.0
    gspo_form: str = "token"
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    tis: bool = False
    tis_cap: float = 2.0
    mis: bool = False
    mis_low: float = 0.5
    mis_high: float = 2.0

    def __post_init__(self) -> None:
        for name in ("c1_pos", "c2_pos", "c1_neg", "c2_neg"):
            _check(name, getattr(self, name), lambda v: v >= 0, "must be >= 0")
        if self.eps_low is not None:
            _check("eps_low", self.eps_low, lambda v: 0 <= v < 1, "must be in [0, 1)")
        if self.eps_high is not None:
            _check("eps_high", self.eps_high, lambda v: v >= 0, "must be >= 0")
        if self.clip_c is not None:
            _check("clip_c", self.clip_c, lambda v: v > 1, "(dual clip) must be > 1")
        if self.gspo_form not in GSPO_FORMS:
            raise ValueError(f"gspo_form: unknown form {self.gspo_form!r}; known: {', '.join(GSPO_FORMS)}")
        for name in ("tis", "mis"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        for name in ("tau_pos", "tau_neg", "tis_cap"):
            _check(name, getattr(self, name), lambda v: v > 0, "must be > 0")
        _check("mis_low", self.mis_low, lambda v: v >= 0, "must be >= 0")
        _check("mis_high", self.mis_high, lambda v: v > self.mis_low, f"must be > mis_low={self.mis_low}")

    @classmethod
    def from_hparams(cls, **hparams: Any) -> "PolicyLossConfig":
        """Build from keyword hyper-parameters, resolving ALIASES; unknown or duplicated names raise ValueError."""
        known = {f.name for f in fields(cls)}
        resolved: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for key, value in hparams.items():
            name = ALIASES.get(key, key)
            if name not in known:
                choices = ", ".join(sorted(known | set(ALIASES)))
                raise ValueError(f"{key}: unknown policy-loss hyper-parameter; known: {choices}")
            if name in resolved:
                raise ValueError(f"{key}: sets {name}, already set by {given_as[name]}")
            resolved[name] = value
            given_as[name] = key
        try:
            return cls(**resolved)
        except ValueError as err:  # name the field as the caller spelled it
            field, _, reason = str(err).partition(":")
            if given_as.get(field, field) == field:
                raise
            raise ValueError(f"{given_as[field]} (alias of {field}):{reason}") from None

    def clip_range(self, default: tuple[float, float]) -> tuple[float, float]:
        """(eps_low, eps_high), falling back to the loss's default for the ones not set."""
        low = default[0] if self.eps_low is None else self.eps_low
        high = default[1] if self.eps_high is None else self.eps_high
        return low, high


@dataclass(frozen=True)
class RegularizerConfig:
    """Coefficients of the regularisers added to every policy loss (formulas in ``regularizers``).

    kl_coef (``--kl-coef``, >= 0): weight of the KL estimate ``kl_loss_type`` (``--kl-loss-type``, one of
    KL_LOSS_TYPES) against the reference log-probs; entropy_coef (``--entropy-coef``): weight of the entropy bonus
    (the loss gets − entropy_coef · H_t). Errors name the flag.
    """

    kl_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        _check("--kl-coef", self.kl_coef, lambda v: 0 <= v < math.inf, "must be a finite number >= 0")
        _check("--entropy-coef", self.entropy_coef, math.isfinite, "must be a finite number")
        if self.kl_loss_type not in KL_LOSS_TYPES:
            raise ValueError(f"--kl-loss-type: unknown type {self.kl_loss_type!r}; known: {', '.join(KL_LOSS_TYPES)}")

    @property
    def active(self) -> bool:
        """True when some term has a non-zero coefficient."""
        return bool(self.kl_coef or self.entropy_coef)


def _check(name: str, value: Any, ok: Any, requirement: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(value):
        raise ValueError(f"{name}: {requirement}, got {value!r}")
