"""The CPU :class:`~.hf_engine.HFEngine` behind SGLang 0.5.23's HTTP protocol (stdlib ``ThreadingHTTPServer``).

Every route served here exists with the same method in the release's route table (``srt/entrypoints/http_server.py``;
tests/contract checks it), takes the release's request fields and answers the release's response fields and status
codes; any other path is 404. Served: /health, /health_generate, /model_info (and the deprecated /get_model_info),
/server_info (/get_server_info), /generate (POST, PUT), /flush_cache (GET, POST; 400 while requests run),
/update_weights_from_disk, /update_weights_from_tensor (400: its CUDA IPC handles cannot reach a CPU server),
/update_weight_version, /init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group
(the engine joins the trainer's group over gloo, see weight_group.py), /pause_generation, /continue_generation,
/abort_request. A body that misses a required field or has a wrong type is answered as the release's request
validation does: 400 ``{"object": "error", "message", "type": "Bad Request", "param": null, "code": 400}``.
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
Reply = tuple[int, Any]  # (HTTP status, JSON-able body, str for a plain-text body, or None for an empty body)
FLUSHED = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting requests, "
           "the operation will not be performed.)\n")

# Request fields of the control routes (io_struct.py request types): name -> (type, default; REQUIRED = none)
REQUIRED = object()
_FIELDS: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "/update_weights_from_disk": {"model_path": (str, REQUIRED), "load_format": ((str, type(None)), None),
                                  "abort_all_requests": (bool, False), "weight_version": ((str, type(None)), None),
                                  "flush_cache": (bool, True)},
    "/update_weights_from_tensor": {"serialized_named_tensors": (list, REQUIRED),
                                    "weight_version": ((str, type(None)), None), "flush_cache": (bool, True)},
    "/update_weight_version": {"new_version": (str, REQUIRED), "abort_all_requests": (bool, True)},
    "/init_weights_update_group": {"master_address": (str, REQUIRED), "master_port": (int, REQUIRED),
                                   "rank_offset": (int, REQUIRED), "world_size": (int, REQUIRED),
                                   "group_name": (str, "weight_update_group"), "backend": (str, "nccl")},
    "/update_weights_from_distributed": {"names": (list, REQUIRED), "dtypes": (list, REQUIRED),
                                         "shapes": (list, REQUIRED), "group_name": (str, "weight_update_group"),
                                         "flush_cache": (bool, True), "abort_all_requests": (bool, False),
                                         "weight_version": ((str, type(None)), None),
                                         "load_format": ((str, type(None)), None)},
    "/destroy_weights_update_group": {"group_name": (str, "weight_update_group")},
    "/pause_generation": {"mode": (str, "abort")},
    "/continue_generation": {"torch_empty_cache": (bool, True)},
    "/abort_request": {"rid": ((str, type(None)), None), "abort_all": (bool, False)},
}


class _HTTPError(Exception):
    def __init__(self, status: int, body: Any):
        super().__init__(str(body))
        self.status = status
        self.body = body


def _validated(path: str, body: Any) -> dict[str, Any]:
    """The request's fields with defaults filled in; 400 in the release's validation-error shape otherwise."""
    fields = _FIELDS[path]
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise _HTTPError(400, _validation_error("the body must be a JSON object"))
    values = {}
    for name, (kind, default) in fields.items():
        if name not in body:
            if default is REQUIRED:
                raise _HTTPError(400, _validation_error(f"body.{name}: Field required"))
            values[name] = default
            continue
        value = body[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _HTTPError(400, _validation_error(f"body.{name}: invalid type {type(value).__name__}"))
        values[name] = value
    return values


def _validation_error(message: str) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of concurrent clients must not overflow the listen backlog


class RolloutServer:
    """Serve ``engine`` at http://host:port (port 0 = any free port; see :attr:`url`)."""

    def __init__(self, engine: HFEngine, host: str = "127.0.0.1", port: int = 0):
        self.engine = engine
        generate = lambda body: (200, engine.handle_generate(body))  # noqa: E731
        model_info = lambda body: (200, engine.get_model_info())  # noqa: E731
        server_info = lambda body: (200, engine.get_server_info())  # noqa: E731
        self._routes: dict[tuple[str, str], Callable[[Any], Reply]] = {
            ("GET", "/health"): lambda body: (200, None),
            ("GET", "/health_generate"): self._health_generate,
            ("GET", "/model_info"): model_info,
            ("GET", "/get_model_info"): model_info,
            ("GET", "/server_info"): server_info,
            ("GET", "/get_server_info"): server_info,
            ("POST", "/generate"): generate,
            ("PUT", "/generate"): generate,
            ("GET", "/flush_cache"): self._flush_cache,
            ("POST", "/flush_cache"): self._flush_cache,
        }
        for path in _FIELDS:
            handler = getattr(self, "_" + path.strip("/"))
            self._routes[("POST", path)] = lambda body, path=path, handler=handler: handler(_validated(path, body))
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
        self.engine.handle_generate({"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}})
        return 200, None

    def _flush_cache(self, body: Any) -> Reply:
        # the engine keeps no cache between requests; the release refuses while requests run or wait
        if self.engine.control.running:
            return 400, "Flush cache failed.\n"
        return 200, FLUSHED

    @staticmethod
    def _result(success: bool, message: str, **extra: Any) -> Reply:
        return (200 if success else 400), {"success": success, "message": message, **extra}

    def _update_weights_from_disk(self, req: dict[str, Any]) -> Reply:
        if req["abort_all_requests"]:
            self.engine.control.abort(abort_all=True)
        success, message, paused = self.engine.load_weights_from_disk(req["model_path"], req["weight_version"])
        return self._result(success, message, num_paused_requests=paused)

    def _update_weights_from_tensor(self, req: dict[str, Any]) -> Reply:
        return self._result(False, "update_weights_from_tensor carries CUDA IPC handles and cannot reach this CPU "
                                   "server: use /update_weights_from_distributed or /update_weights_from_disk")

    def _update_weight_version(self, req: dict[str, Any]) -> Reply:
        if req["abort_all_requests"]:
            self.engine.control.abort(abort_all=True)
        self.engine.update_weight_version(req["new_version"])
        return 200, {"success": True, "message": f"Weight version updated to {req['new_version']}",
                     "new_version": req["new_version"]}

    def _init_weights_update_group(self, req: dict[str, Any]) -> Reply:
        return self._result(*self.engine.init_weights_update_group(**req))

    def _update_weights_from_distributed(self, req: dict[str, Any]) -> Reply:
        if req.pop("abort_all_requests"):
            self.engine.control.abort(abort_all=True)
        return self._result(*self.engine.update_weights_from_distributed(**req))

    def _destroy_weights_update_group(self, req: dict[str, Any]) -> Reply:
        return self._result(*self.engine.destroy_weights_update_group(req["group_name"]))

    def _pause_generation(self, req: dict[str, Any]) -> Reply:
        self.engine.control.pause(req["mode"])
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def _continue_generation(self, req: dict[str, Any]) -> Reply:
        self.engine.control.resume()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def _abort_request(self, req: dict[str, Any]) -> Reply:
        self.engine.control.abort(req["rid"] or "", req["abort_all"])
        return 200, None


class _Handler(BaseHTTPRequestHandler):
    routes: dict[tuple[str, str], Callable[[Any], Reply]] = {}

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None
        try:
            return json.loads(self.rfile.read(length))
        except ValueError as err:
            raise _HTTPError(400, _validation_error(f"request body is not valid JSON: {err}")) from None

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            route = self.routes.get((method, path))
            if route is None:
                known = any(p == path for _, p in self.routes)
                raise _HTTPError(405 if known else 404, {"detail": "Method Not Allowed" if known else "Not Found"})
            status, body = route(self._body())
        except _HTTPError as err:
            status, body = err.status, err.body
        except ValueError as err:
            status, body = 400, error_body(str(err))
        except Exception as err:  # an engine bug must answer 500, not drop the connection
            log.exception("%s %s failed", method, path)
            status, body = 500, error_body(f"{type(err).__name__}: {err}")
        self._send(status, body)

    def _send(self, status: int, body: Any) -> None:
        plain = body is None or isinstance(body, str)
        data = (body or "").encode() if plain else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if plain else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)
