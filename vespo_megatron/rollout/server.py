"""The CPU :class:`~.hf_engine.HFEngine` behind SGLang's HTTP protocol (stdlib ``ThreadingHTTPServer``).

Same paths, request fields and response layout as an SGLang server started with ``--skip-tokenizer-init``
(``input_ids`` only; ``text`` is answered 400): /generate (POST or PUT), /health, /health_generate,
/get_model_info, /get_server_info, /get_weight_version, /update_weight_version, /update_weights_from_disk,
/update_weights_from_tensor (400: it carries CUDA IPC handles, use the disk path on CPU), /flush_cache. One extra,
non-SGLang endpoint: POST /get_weights_checksum {"names": [...] | absent} -> {"weight_version", "tensors": {name:
{"dtype", "digest"}}}, so a trainer can check that the engine holds the weights it sent.
Requests are served concurrently; the engine serialises model forwards (one sequence at a time).
"""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from vespo_megatron.rollout.hf_engine import HFEngine
from vespo_megatron.rollout.protocol import error_body

log = logging.getLogger(__name__)
Reply = tuple[int, Any]  # (HTTP status, JSON-able body, or str for a plain-text body)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of concurrent clients must not overflow the listen backlog


class RolloutServer:
    """Serve ``engine`` at http://host:port (port 0 = any free port; see :attr:`url`)."""

    def __init__(self, engine: HFEngine, host: str = "127.0.0.1", port: int = 0):
        self.engine = engine
        self._routes: dict[tuple[str, str], Callable[[Any], Reply]] = {
            ("GET", "/health"): lambda body: (200, ""),
            ("GET", "/health_generate"): self._health_generate,
            ("GET", "/get_model_info"): lambda body: (200, engine.get_model_info()),
            ("GET", "/get_server_info"): self._server_info,
            ("GET", "/get_weight_version"): lambda body: (200, {"weight_version": engine.weight_version}),
            ("POST", "/update_weight_version"): self._update_weight_version,
            ("POST", "/generate"): lambda body: (200, engine.handle_generate(body)),
            ("PUT", "/generate"): lambda body: (200, engine.handle_generate(body)),
            ("POST", "/update_weights_from_disk"): self._update_from_disk,
            ("POST", "/update_weights_from_tensor"): self._update_from_tensor,
            ("POST", "/get_weights_checksum"): self._checksum,
            ("GET", "/flush_cache"): lambda body: (200, "Cache flushed.\n"),
            ("POST", "/flush_cache"): lambda body: (200, "Cache flushed.\n"),
        }
        handler = type("Handler", (_Handler,), {"routes": self._routes})
        self.httpd = _Server((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "RolloutServer":
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="rollout-server",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "RolloutServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ handlers
    def _health_generate(self, body: Any) -> Reply:
        self.engine.handle_generate({"input_ids": [0], "sampling_params": {"max_new_tokens": 1}})
        return 200, ""

    def _server_info(self, body: Any) -> Reply:
        engine = self.engine
        return 200, {"model_path": engine.model_path, "dtype": str(engine.dtype).removeprefix("torch."),
                     "skip_tokenizer_init": True, "tp_size": 1, "dp_size": 1,
                     "enable_return_routed_experts": engine.enable_return_routed_experts,
                     "context_length": engine.context_len, "weight_version": engine.weight_version}

    def _update_weight_version(self, body: Any) -> Reply:
        version = (body or {}).get("new_version")
        if not isinstance(version, str):
            raise ValueError("update_weight_version needs a string new_version")
        self.engine.weight_version = version
        return 200, {"success": True, "message": f"weight version set to {version}"}

    def _update_from_disk(self, body: Any) -> Reply:
        if not isinstance(body, dict) or not isinstance(body.get("model_path"), str):
            raise ValueError("update_weights_from_disk needs a string model_path")
        success, message, paused = self.engine.update_weights_from_disk(
            body["model_path"], body.get("load_format"), body.get("weight_version"))
        return (200 if success else 400), {"success": success, "message": message, "num_paused_requests": paused}

    def _update_from_tensor(self, body: Any) -> Reply:
        return 400, {"success": False, "message": "update_weights_from_tensor carries CUDA IPC handles and cannot "
                                                  "reach this CPU server: use /update_weights_from_disk"}

    def _checksum(self, body: Any) -> Reply:
        names = (body or {}).get("names")
        return 200, {"weight_version": self.engine.weight_version, "tensors": self.engine.weights_checksum(names)}


class _Handler(BaseHTTPRequestHandler):
    routes: dict[tuple[str, str], Callable[[Any], Reply]] = {}

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None
        try:
            return json.loads(self.rfile.read(length))
        except ValueError as err:
            raise _HTTPError(400, f"request body is not valid JSON: {err}") from None

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            route = self.routes.get((method, path))
            if route is None:
                raise _HTTPError(404, f"no route {method} {path}")
            status, body = route(self._body())
        except _HTTPError as err:
            status, body = err.status, error_body(str(err))
        except ValueError as err:
            status, body = 400, error_body(str(err))
        except Exception as err:  # an engine bug must answer 500, not drop the connection
            log.exception("%s %s failed", method, path)
            status, body = 500, error_body(f"{type(err).__name__}: {err}")
        self._send(status, body)

    def _send(self, status: int, body: Any) -> None:
        plain = isinstance(body, str)
        data = (body if plain else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if plain else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

