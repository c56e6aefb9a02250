"""Client of a running SGLang 0.5.23 HTTP server (:class:`SGLangClient`, also ``vespo-megatron serve``); the
in-process ``sglang.Engine`` client is :class:`~.engine_client.SGLangEngineClient`, what both share (request building,
the seed check, record parsing) :mod:`~.client`.

The HTTP client runs at most ``max_concurrency`` requests at once; every request has a timeout and is retried with
exponential backoff on connection errors, timeouts and HTTP 5xx; 4xx and malformed responses raise at once.
Only routes and fields of the 0.5.23 release are used (tests/contract checks them against the release's source).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from vespo_megatron.rollout.client import ClientBase, RolloutError, Sample, import_sglang
from vespo_megatron.routing.trace import TraceSpec

log = logging.getLogger(__name__)
_RETRIABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class SGLangClient(ClientBase):
    """Client of a running SGLang 0.5.23 server (or of ``vespo-megatron serve``) at ``base_url``."""

    def __init__(self, base_url: str, *, routing: TraceSpec | None = None, timeout_s: float = 120.0,
                 max_retries: int = 3, backoff_s: float = 0.5, max_concurrency: int = 32,
                 require_deterministic: bool = False):
        super().__init__(routing, require_deterministic)
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self._local = threading.local()

    @property
    def name(self) -> str:
        return f"engine {self.base_url}"

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _request(self, method: str, path: str, what: str, payload: Any = None, *,
                 timeout_s: float | None = None) -> requests.Response:
        """One call with retries on connection errors, timeouts and 5xx; RolloutError names ``what`` and the engine.

        ``payload`` may be a function of the attempt number (a retried /generate needs a fresh rid: SGLang refuses
        a rid that is still in flight, e.g. after a client-side timeout).
        """
        last = ""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            body = payload(attempt) if callable(payload) else payload
            try:
                response = self._session().request(method, self.base_url + path, json=body, timeout=timeout)
            except _RETRIABLE as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code >= 400:
                raise RolloutError(f"{what}: HTTP {response.status_code}: {response.text[:500]} "
                                   f"(at {self.base_url}{path})")
            return response
        raise RolloutError(f"{what}: failed after {self.max_retries + 1} attempts (timeout {timeout}s "
                           f"each) at {self.base_url}{path}: {last}")

    def _json(self, method: str, path: str, what: str, payload: Any = None, **kwargs: Any) -> Any:
        response = self._request(method, path, what, payload, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise RolloutError(f"{what}: malformed JSON from {path}: {response.text[:200]!r}") from None

    def _json_with_fallback(self, path: str, deprecated: str) -> Any:
        """GET ``path``; on 404 (an older server) GET its deprecated alias."""
        try:
            return self._json("GET", path, path.strip("/"))
        except RolloutError as err:
            if "HTTP 404" not in str(err):
                raise
        return self._json("GET", deprecated, deprecated.strip("/"))

    def _generate_samples(self, samples: list[Sample], extra: dict[str, Any]) -> list[Any]:
        def one(sample: Sample) -> Any:
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

    # ------------------------------------------------------------------ server state
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
        """GET /model_info (http_server.py:812), falling back to the deprecated /get_model_info (:802)."""
        return self._json_with_fallback("/model_info", "/get_model_info")

    def get_server_info(self) -> dict[str, Any]:
        """GET /server_info (http_server.py:863), falling back to the deprecated /get_server_info (:853)."""
        return self._json_with_fallback("/server_info", "/get_server_info")

    def get_weight_version(self) -> str:
        """The served weight version: /model_info's ``weight_version`` (http_server.py:824)."""
        info = self.get_model_info()
        if "weight_version" not in info:
            raise RolloutError(f"{self.name}: model_info has no weight_version: {str(info)[:200]}")
        return info["weight_version"]

    def serves_distributed_update(self) -> bool:
        """Whether the server has POST /update_weights_from_distributed: a GET answers 405 there (the route exists
        for another method), 404 on a server without it. One attempt, no retries."""
        try:
            status = self._session().get(self.base_url + "/update_weights_from_distributed",
                                         timeout=self.timeout_s).status_code
        except _RETRIABLE:
            return False
        return status == 405

    def tp_size(self) -> int:
        """Tensor-parallel ranks of the server (``tp_size`` of /server_info, server_args.py resolved_dict)."""
        return int(self.get_server_info().get("tp_size", 1))

    # ------------------------------------------------------------------ weight updates
    def _check_update(self, result: Any, what: str) -> None:
        # {"success", "message"}: http_server.py:1312-1316 (disk), 1416 (group), 1452 (tensor), 1501 (distributed)
        if not isinstance(result, dict) or not result.get("success"):
            raise RolloutError(f"{what} at {self.base_url}: the server refused: {result!r}")

    def _update(self, path: str, payload: dict[str, Any], what: str, timeout_s: float | None = None) -> None:
        self._check_update(self._json("POST", path, what, payload, timeout_s=timeout_s), what)

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                 flush_cache: bool = True) -> None:
        """POST /update_weights_from_disk (UpdateWeightFromDiskReqInput); raises unless it succeeded."""
        payload: dict[str, Any] = {"model_path": str(model_path), "flush_cache": flush_cache}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        self._update("/update_weights_from_disk", payload, f"update_weights_from_disk({model_path})")

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, Any]], weight_version: str | None = None,
                                   tp_size: int | None = None, flush_cache: bool = True) -> None:
        """POST /update_weights_from_tensor: one serialized payload per TP rank (rank r reads entry r,
        managers/tp_worker.py:200), each a base64 ``MultiprocessingSerializer`` pickle of CUDA IPC handles (caller on
        the server's node; needs sglang). ``tp_size`` defaults to the server's."""
        utils = import_sglang("sglang.srt.utils")
        named = list(named_tensors)
        ranks = self.tp_size() if tp_size is None else tp_size
        payload: dict[str, Any] = {
            "serialized_named_tensors": [utils.MultiprocessingSerializer.serialize(named, output_str=True)
                                         for _ in range(ranks)],
            "flush_cache": flush_cache,
        }
        if weight_version is not None:
            payload["weight_version"] = weight_version
        self._update("/update_weights_from_tensor", payload, "update_weights_from_tensor")

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> None:
        """POST /init_weights_update_group: the server's ranks join the trainer's group as rank_offset + tp_rank."""
        self._update("/init_weights_update_group", {
            "master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend,
        }, f"init_weights_update_group({group_name})")

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], group_name: str = "weight_update_group",
                                        weight_version: str | None = None, flush_cache: bool = True,
                                        timeout_s: float | None = None) -> None:
        """POST /update_weights_from_distributed: the server receives one broadcast per tensor (src 0) of the group."""
        payload: dict[str, Any] = {"names": list(names), "dtypes": list(dtypes),
                                   "shapes": [list(map(int, s)) for s in shapes], "group_name": group_name,
                                   "flush_cache": flush_cache}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        self._update("/update_weights_from_distributed", payload,
                     f"update_weights_from_distributed({len(payload['names'])} tensors)", timeout_s)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        """POST /destroy_weights_update_group."""
        self._update("/destroy_weights_update_group", {"group_name": group_name},
                     f"destroy_weights_update_group({group_name})")

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> None:
        """POST /update_weight_version ({"success", "message", "new_version"}: http_server.py:1539-1545)."""
        self._update("/update_weight_version", {"new_version": new_version, "abort_all_requests": abort_all_requests},
                     f"update_weight_version({new_version})")

    # ------------------------------------------------------------------ scheduling control
    def pause_generation(self, mode: str = "retract") -> None:
        """POST /pause_generation (PauseGenerationReqInput.mode: abort | retract | in_place)."""
        self._json("POST", "/pause_generation", "pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        """POST /continue_generation."""
        self._json("POST", "/continue_generation", "continue_generation", {})

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """POST /abort_request (AbortReq: rid, abort_all); 200 with an empty body (http_server.py:1721-1730)."""
        self._request("POST", "/abort_request", f"abort_request({rid or 'all'})", {"rid": rid, "abort_all": abort_all})

    def flush_cache(self) -> bool:
        """POST /flush_cache: True when flushed; False when requests were running (HTTP 400, http_server.py:1025)."""
        try:
            self._request("POST", "/flush_cache", "flush_cache")
        except RolloutError as err:
            if "HTTP 400" in str(err):
                return False
            raise
        return True
