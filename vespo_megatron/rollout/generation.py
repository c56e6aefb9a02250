"""Generation settings of a run (``--rollout-*``) -> SGLang ``sampling_params``.

Stop tokens are the model's own (``data.tokenizer.eos_token_ids``: generation_config.json, config.json, the
tokenizer's EOS) plus ``--rollout-stop-token-ids``; ``--rollout-stop`` adds stop strings (a real SGLang server
detokenises; the CPU engine has no tokenizer and rejects them with a clear error). Greedy decoding is temperature 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class GenerationSettings:
    """``max_response_len`` tokens at most per response; SGLang's meaning for temperature / top_p / top_k (-1 = all)."""

    max_response_len: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> "GenerationSettings":
        checks = [
            (self.max_response_len >= 1, f"--rollout-max-response-len: must be >= 1, got {self.max_response_len}"),
            (self.temperature >= 0, f"--rollout-temperature: must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"--rollout-top-p: must be in (0, 1], got {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 1, f"--rollout-top-k: -1 (all) or >= 1, got {self.top_k}"),
            (all(t >= 0 for t in self.stop_token_ids), f"--rollout-stop-token-ids: ids must be >= 0, got "
                                                       f"{list(self.stop_token_ids)}"),
            (all(self.stop), "--rollout-stop: stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def sampling_params(self, eos_ids: Sequence[int] = (), greedy: bool = False) -> dict[str, Any]:
        """SGLang ``sampling_params``: the model's ``eos_ids`` and the extra stop ids stop generation."""
        params: dict[str, Any] = {
            "max_new_tokens": self.max_response_len,
            "temperature": 0.0 if greedy else self.temperature,
            "top_p": 1.0 if greedy else self.top_p,
            "top_k": -1 if greedy else self.top_k,
            "stop_token_ids": sorted({int(t) for t in (*eos_ids, *self.stop_token_ids)}),
        }
        if self.stop:
            params["stop"] = list(self.stop)
        return params
