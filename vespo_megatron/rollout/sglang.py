"""Clients of an SGLang rollout engine: a running HTTP server (:class:`SGLangClient`) or an in-process
``sglang.Engine`` (:class:`SGLangEngineClient`, also usable with the CPU :class:`~.hf_engine.HFEngine`).

Both turn prompts into :class:`~.records.RolloutRecord` s: prompt ids, response ids, per-token rollout log-probs,
routing trace and finish reason. Sample j of a ``generate`` call gets rid ``{prefix}-{j}`` and, when ``seed`` is
given, ``sampling_seed`` = a hash of (seed, j), so a fixed seed gives the same samples whatever the concurrency.
The HTTP client runs at most ``max_concurrency`` requests at once; every request has a timeout and is retried with
exponential backoff on connection errors, timeouts and HTTP 5xx; 4xx and malformed responses raise at once.
sglang itself is imported lazily; without it only the paths that need it fail, saying what to install.
"""
from __future__ import annotations

import abc
import importlib
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests

from vespo_megatron.rollout.records import RolloutRecord, record_from_response
from vespo_megatron.routing.trace import TraceSpec

INSTALL_HINT = "sglang is not installed: `pip install \"sglang[all]\"` on a CUDA machine (see SGLang's install guide)"
_RETRIABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class RolloutError(RuntimeError):
    """A request to the rollout engine failed; the message names the request."""


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
class _Sample:
    rid: str
    prompt: list[int]
    sampling_params: dict[str, Any]


class _ClientBase(abc.ABC):
    """Request building and record parsing shared by the HTTP and the in-process clients."""

    def __init__(self, routing: TraceSpec | None):
        self.routing = routing

    def generate(self, prompts: Sequence[Sequence[int]], sampling_params: dict[str, Any] | None = None, *,
                 samples_per_prompt: int = 1, seed: int | None = None, return_routed_experts: bool = False,
                 routed_experts_start_len: int = 0, rid_prefix: str | None = None) -> list[RolloutRecord]:
        """Generate ``samples_per_prompt`` samples per prompt, prompt-major; one record per sample, in order."""
        if return_routed_experts and self.routing is None:
            raise ValueError("return_routed_experts needs the model's TraceSpec (routing=...) on the client")
        prefix = rid_prefix or uuid.uuid4().hex[:12]
        samples = []
        for prompt in prompts:
            for _ in range(samples_per_prompt):
                params = dict(sampling_params or {})
                if seed is not None:
                    params["sampling_seed"] = sample_seed(seed, len(samples))
                samples.append(_Sample(f"{prefix}-{len(samples)}", [int(t) for t in prompt], params))
        extra: dict[str, Any] = {"return_logprob": True}
        if return_routed_experts:
            extra["return_routed_experts"] = True
            if routed_experts_start_len:  # older servers do not know the field
                extra["routed_experts_start_len"] = routed_experts_start_len
        responses = self._generate_samples(samples, extra)
        spec = self.routing if return_routed_experts else None
        return [record_from_response(resp, s.rid, s.prompt, spec, routed_experts_start_len)
                for s, resp in zip(samples, responses)]

    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """Log-probs [len − 1] of tokens 1.. of a fixed sequence under the engine (prefill only, T = 1)."""
        body = {"return_logprob": True, "logprob_start_len": 0}
        sample = _Sample(f"score-{uuid.uuid4().hex[:12]}", [int(t) for t in token_ids],
                         {"max_new_tokens": 0, "temperature": 1.0})
        meta = self._generate_samples([sample], body)[0].get("meta_info", {})
        entries = meta.get("input_token_logprobs") or []
        if len(entries) != len(token_ids):
            raise RolloutError(f"request {sample.rid}: {len(entries)} prompt log-probs for {len(token_ids)} tokens")
        return np.asarray([entry[0] for entry in entries[1:]], dtype=np.float32)

    @abc.abstractmethod
    def _generate_samples(self, samples: list[_Sample], extra: dict[str, Any]) -> list[Any]:
        """One response dict per sample, in order (HTTP or in-process)."""


class SGLangClient(_ClientBase):
    """Client of a running SGLang server (or of ``vespo-megatron serve``) at ``base_url``."""

    def __init__(self, base_url: str, *, routing: TraceSpec | None = None, timeout_s: float = 120.0,
                 max_retries: int = 3, backoff_s: float = 0.5, max_concurrency: int = 32):
        super().__init__(routing)
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _request(self, method: str, path: str, what: str, payload: Any = None) -> requests.Response:
        """One call with retries on connection errors, timeouts and 5xx; RolloutError names ``what``.

        ``payload`` may be a function of the attempt number (a retried /generate needs a fresh rid: SGLang refuses
        a rid that is still in flight, e.g. after a client-side timeout).
        """
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            body = payload(attempt) if callable(payload) else payload
            try:
                response = self._session().request(method, self.base_url + path, json=body, timeout=self.timeout_s)
            except _RETRIABLE as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code >= 400:
                raise RolloutError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
            return response
        raise RolloutError(f"{what}: failed after {self.max_retries + 1} attempts (timeout {self.timeout_s}s "
                           f"each) at {self.base_url}{path}: {last}")

    def _json(self, method: str, path: str, what: str, payload: Any = None) -> Any:
        response = self._request(method, path, what, payload)
        try:
            return response.json()
        except ValueError:
            raise RolloutError(f"{what}: malformed JSON from {path}: {response.text[:200]!r}") from None

    def _generate_samples(self, samples: list[_Sample], extra: dict[str, Any]) -> list[Any]:
        def one(sample: _Sample) -> Any:
            def body(attempt: int) -> dict[str, Any]:
                rid = f"{sample.rid}-retry{attempt}" if attempt else sample.rid
                return {"input_ids": sample.prompt, "sampling_params": sample.sampling_params, "rid": rid, **extra}

            return self._json("POST", "/generate", f"request {sample.rid}", body)

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(len(samples), 1))) as pool:
            futures = [pool.submit(one, sample) for sample in samples]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def health(self) -> bool:
        """GET /health: True when the server answers 200 (one attempt, no retries)."""
        try:
            return self._session().get(self.base_url + "/health", timeout=self.timeout_s).status_code == 200
        except _RETRIABLE:
            return False

    def wait_until_healthy(self, timeout_s: float = 300.0, poll_s: float = 1.0) -> None:
        """Poll /health until 200; RolloutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.health():
            if time.monotonic() > deadline:
                raise RolloutError(f"{self.base_url}: /health not OK after {timeout_s}s")
            time.sleep(poll_s)

    def get_model_info(self) -> dict[str, Any]:
        return self._json("GET", "/get_model_info", "get_model_info")

    def get_weight_version(self) -> str:
        return self._json("GET", "/get_weight_version", "get_weight_version")["weight_version"]

    def _check_update(self, result: Any, what: str) -> None:
        if not isinstance(result, dict) or not result.get("success"):
            raise RolloutError(f"{what}: the server refused the update: {result!r}")

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        """POST /update_weights_from_disk (an HF directory the server can read); raises unless it succeeded."""
        payload = {"model_path": str(model_path)}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        result = self._json("POST", "/update_weights_from_disk", f"update_weights_from_disk({model_path})", payload)
        self._check_update(result, f"update_weights_from_disk({model_path})")

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, Any]], weight_version: str | None = None,
                                   tp_size: int = 1) -> None:
        """POST /update_weights_from_tensor: CUDA IPC handles (caller on the server's node; needs sglang)."""
        utils = import_sglang("sglang.srt.utils")
        payload_one = utils.MultiprocessingSerializer.serialize(list(named_tensors), output_str=True)
        payload: dict[str, Any] = {"serialized_named_tensors": [payload_one] * tp_size, "flush_cache": True}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        self._check_update(self._json("POST", "/update_weights_from_tensor", "update_weights_from_tensor", payload),
                           "update_weights_from_tensor")

    def weights_checksum(self, names: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
        """Per-tensor digests from ``vespo-megatron serve`` (POST /get_weights_checksum; not an SGLang endpoint)."""
        payload = {"names": list(names)} if names is not None else {}
        return self._json("POST", "/get_weights_checksum", "get_weights_checksum", payload)["tensors"]


class SGLangEngineClient(_ClientBase):
    """Client of an in-process engine with ``sglang.Engine``'s interface (or the CPU HFEngine)."""

    def __init__(self, engine: Any, *, routing: TraceSpec | None = None):
        super().__init__(routing)
        self.engine = engine

    @classmethod
    def launch(cls, *, routing: TraceSpec | None = None, **server_args: Any) -> "SGLangEngineClient":
        """Start ``sglang.Engine(**server_args)`` (e.g. model_path, tp_size, enable_return_routed_experts=True)."""
        return cls(import_sglang().Engine(**server_args), routing=routing)

    def _generate_samples(self, samples: list[_Sample], extra: dict[str, Any]) -> list[Any]:
        outputs = self.engine.generate(input_ids=[s.prompt for s in samples],
                                       sampling_params=[s.sampling_params for s in samples],
                                       rid=[s.rid for s in samples], **extra)
        if not isinstance(outputs, list) or len(outputs) != len(samples):
            raise RolloutError(f"engine returned {type(outputs).__name__} for a batch of {len(samples)} requests "
                               f"({samples[0].rid}..{samples[-1].rid})")
        return outputs

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        success, message, *_ = self.engine.update_weights_from_disk(str(model_path), **_version(weight_version))
        if not success:
            raise RolloutError(f"update_weights_from_disk({model_path}): {message}")

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, Any]],
                                   weight_version: str | None = None) -> None:
        success, message = self.engine.update_weights_from_tensor(list(named_tensors), **_version(weight_version))
        if not success:
            raise RolloutError(f"update_weights_from_tensor: {message}")

    def get_weight_version(self) -> str:
        return self.engine.get_model_info()["weight_version"]

    def weights_checksum(self, names: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
        """Per-tensor digests (the CPU HFEngine; sglang.Engine has none: check weights with a probe instead)."""
        if not hasattr(self.engine, "weights_checksum"):
            raise RolloutError(f"{type(self.engine).__name__} reports no weight digests: verify with a probe")
        return self.engine.weights_checksum(names)


def _version(weight_version: str | None) -> dict[str, str]:
    """``weight_version`` keyword only when set (older sglang.Engine methods do not take it)."""
    return {} if weight_version is None else {"weight_version": weight_version}
