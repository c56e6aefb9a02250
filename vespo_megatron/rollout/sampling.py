"""SGLang sampling parameters and the token sampler of the CPU rollout engine.

The reported log-prob follows SGLang's default (``srt/layers/sampler.py``): ``log_softmax(logits / T)[token]``, i.e.
temperature-scaled but taken BEFORE top-k / top-p / min-p renormalisation. A temperature below 1e-6 means greedy
decoding, and then the log-prob is ``log_softmax(logits)[token]`` (SGLang resets T to 1 and uses top_k = 1).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

GREEDY_TEMPERATURE = 1e-6

# SGLang fields this engine accepts only at their default value (no tokenizer, no penalties, no grammar).
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "stop": None, "stop_regex": None, "regex": None, "json_schema": None, "ebnf": None, "logit_bias": None,
    "custom_params": None, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
}
# SGLang fields that only change detokenisation or streaming; accepted and ignored (there is no text output).
_TEXT_ONLY = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval"}


@dataclass(frozen=True)
class SamplingParams:
    """The subset of SGLang's ``sampling_params`` the CPU engine implements; defaults are SGLang's."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = 0
    sampling_seed: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, where: str) -> "SamplingParams":
        """Parse a JSON ``sampling_params`` dict (``null`` = default); ValueError naming ``where`` and the field."""
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None or key in _TEXT_ONLY:
                continue
            if key in _UNSUPPORTED_DEFAULTS:
                if value != _UNSUPPORTED_DEFAULTS[key]:
                    hint = " (string stops need a tokenizer; use stop_token_ids)" if key == "stop" else ""
                    raise ValueError(f"{where}: sampling_params.{key}={value!r} is not supported by this engine{hint}")
                continue
            if key not in known:
                raise ValueError(f"{where}: unknown sampling_params field {key!r}")
            kwargs[key] = tuple(int(t) for t in value) if key == "stop_token_ids" else value
        params = cls(**kwargs)
        params._validate(where)
        return params

    def _validate(self, where: str) -> None:
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "max_new_tokens must be an int >= 0"),
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k must be -1 (all tokens) or >= 1"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (isinstance(self.n, int) and self.n >= 1, "n must be an int >= 1"),
            (self.min_new_tokens >= 0, "min_new_tokens must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{where}: sampling_params: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def token_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Reported log-probs [..., V] in fp32: ``log_softmax(logits / T)`` (T = 1 when greedy)."""
    scaled = logits.float() if params.greedy else logits.float() / params.temperature
    return torch.log_softmax(scaled, dim=-1)


def filtered_probs(logprobs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sampling distribution [V] after top-k, top-p (nucleus) and min-p filtering, renormalised.

    top-k keeps the k most likely tokens; top-p keeps the smallest prefix of tokens sorted by probability whose mass
    reaches p (a token is kept if the mass strictly before it is < p); min-p keeps tokens with p_i >= min_p · max p.
    """
    probs = logprobs.exp()
    keep = torch.ones_like(probs, dtype=torch.bool)
    if params.top_k != -1 and params.top_k < probs.numel():
        keep &= probs >= torch.topk(probs, params.top_k).values[-1]
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
        keep_sorted = mass_before < params.top_p
        keep &= torch.zeros_like(keep).scatter(0, order, keep_sorted)
    if params.min_p > 0.0:
        keep &= probs >= params.min_p * probs.max()
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                 banned: list[int] | None = None) -> tuple[int, float]:
    """Sample one token from last-position logits [V]; returns (token id, reported log-prob).

    ``banned`` tokens (stop tokens before ``min_new_tokens``) get logit −inf before anything else, as SGLang's
    min-new-tokens penalty does, so they also count in the reported log-prob.
    """
    logits = logits.float()
    if banned:
        logits = logits.clone()
        logits[banned] = float("-inf")
    logprobs = token_logprobs(logits, params)
    if params.greedy:
        token = int(torch.argmax(logprobs))
    else:
        token = int(torch.multinomial(filtered_probs(logprobs, params), 1, generator=generator))
    return token, float(logprobs[token])
