"""What every rollout client shares: request building (rids ``{prefix}-{j}``, per-sample ``sampling_seed``), the
seed check and record parsing (:class:`ClientBase`), the error type, and the lazy sglang import.

Sample j of a ``generate`` call gets rid ``{prefix}-{j}`` and, when ``seed`` is given, ``sampling_seed`` = a hash of
(seed, j). SGLang honours ``sampling_seed`` only when the server runs with ``--enable-deterministic-inference`` (it
reads the seed in ``sampling/sampling_batch_info.py`` only then): the client reads that flag from /server_info once,
and either refuses (``require_deterministic=True``) or warns once. sglang itself is imported lazily; without it only
the paths that need it fail, saying what to install.
"""
from __future__ import annotations

import abc
import importlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vespo_megatron.rollout.records import RolloutRecord, record_from_response
from vespo_megatron.routing.trace import TraceSpec

log = logging.getLogger(__name__)
INSTALL_HINT = "sglang is not installed: `pip install \"sglang[all]\"` on a CUDA machine (see SGLang's install guide)"
DETERMINISTIC_FLAG = "--enable-deterministic-inference"


class RolloutError(RuntimeError):
    """A request to the rollout engine failed; the message names the request (and the engine)."""


def import_sglang(module: str = "sglang") -> Any:
    """Import an sglang module, or raise ImportError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err


def sample_seed(seed: int, index: int) -> int:
    """Per-sample ``sampling_seed``: a 63-bit hash of (seed, sample index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Sample:
    """One generation request: its rid, prompt token ids [T_prompt] and sampling params."""

    rid: str
    prompt: list[int]
    sampling_params: dict[str, Any]


class ClientBase(abc.ABC):
    """Request building, the seed check and record parsing shared by the HTTP and the in-process clients."""

    def __init__(self, routing: TraceSpec | None, require_deterministic: bool = False):
        self.routing = routing
        self.require_deterministic = require_deterministic
        self._deterministic: bool | None = None  # the server's flag, read once

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The engine, as error messages name it."""

    @abc.abstractmethod
    def get_server_info(self) -> dict[str, Any]:
        """The server's resolved arguments (``/server_info``, ``Engine.get_server_info``)."""

    def _check_seed_honoured(self) -> None:
        """Refuse or warn once when ``sampling_seed`` will be ignored (server without the deterministic flag)."""
        if self._deterministic is None:
            try:
                # ServerArgs fields are flattened into /server_info (utils/common.py:3589, server_args.py:551)
                self._deterministic = bool(self.get_server_info().get("enable_deterministic_inference", False))
            except (RolloutError, OSError, ValueError) as err:
                self._deterministic = False
                log.warning("%s: cannot read server_info (%s); assuming seeds are not honoured", self.name, err)
            if not self._deterministic and not self.require_deterministic:
                log.warning("%s runs without %s: SGLang ignores sampling_seed there, so the same seed will not give "
                            "the same samples", self.name, DETERMINISTIC_FLAG)
        if not self._deterministic and self.require_deterministic:
            raise RolloutError(f"{self.name}: reproducible sampling needs the server started with {DETERMINISTIC_FLAG} "
                               "(it ignores sampling_seed otherwise)")

    def generate(self, prompts: Sequence[Sequence[int]], sampling_params: dict[str, Any] | None = None, *,
                 samples_per_prompt: int = 1, seed: int | None = None, return_routed_experts: bool = False,
                 routed_experts_start_len: int = 0, rid_prefix: str | None = None) -> list[RolloutRecord]:
        """Generate ``samples_per_prompt`` samples per prompt, prompt-major; one record per sample, in order."""
        if return_routed_experts and self.routing is None:
            raise ValueError("return_routed_experts needs the model's TraceSpec (routing=...) on the client")
        if seed is not None:
            self._check_seed_honoured()
        prefix = rid_prefix or uuid.uuid4().hex[:12]
        samples = []
        for prompt in prompts:
            for _ in range(samples_per_prompt):
                params = dict(sampling_params or {})
                if seed is not None:
                    params["sampling_seed"] = sample_seed(seed, len(samples))
                samples.append(Sample(f"{prefix}-{len(samples)}", [int(t) for t in prompt], params))
        extra: dict[str, Any] = {"return_logprob": True}
        if return_routed_experts:
            extra["return_routed_experts"] = True
            if routed_experts_start_len:
                extra["routed_experts_start_len"] = routed_experts_start_len
        responses = self._generate_samples(samples, extra)
        spec = self.routing if return_routed_experts else None
        return [record_from_response(resp, s.rid, s.prompt, spec, routed_experts_start_len)
                for s, resp in zip(samples, responses)]

    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """Log-probs [len − 1] of tokens 1.. of a fixed sequence under the engine (prefill only, T = 1)."""
        body = {"return_logprob": True, "logprob_start_len": 0}
        sample = Sample(f"score-{uuid.uuid4().hex[:12]}", [int(t) for t in token_ids],
                         {"max_new_tokens": 0, "temperature": 1.0})
        # meta_info.input_token_logprobs: tokenizer_manager.py:2868 (entry 0 is None: no logprob for token 0)
        meta = self._generate_samples([sample], body)[0].get("meta_info", {})
        entries = meta.get("input_token_logprobs") or []
        if len(entries) != len(token_ids):
            raise RolloutError(f"request {sample.rid}: {len(entries)} prompt log-probs for {len(token_ids)} tokens")
        return np.asarray([entry[0] for entry in entries[1:]], dtype=np.float32)

    @abc.abstractmethod
    def _generate_samples(self, samples: list[Sample], extra: dict[str, Any]) -> list[Any]:
        """One response dict per sample, in order (HTTP or in-process)."""
