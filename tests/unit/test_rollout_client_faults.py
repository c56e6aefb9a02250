"""SGLang client fault handling against a scripted loopback server: each fault is retried or a clear error naming
the request, and nothing hangs."""
from __future__ import annotations

import base64
import json
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from vespo_megatron.rollout.records import RolloutResponseError
from vespo_megatron.rollout.client import RolloutError
from vespo_megatron.rollout.engine_client import SGLangEngineClient
from vespo_megatron.rollout.sglang import SGLangClient
from vespo_megatron.routing.trace import TraceSpec

pytestmark = pytest.mark.timeout(300)

SPEC = TraceSpec(num_hf_layers=2, moe_layers=(0, 1), num_experts=4, topk=2)
PROMPT = [1, 2, 3]
TRACE = np.array([[[0, 1], [2, 3]]] * 4, dtype="<i4")  # rows = 3 + 2 - 1


def _ok(**meta_overrides) -> bytes:
    meta = {"id": "x", "finish_reason": {"type": "length", "length": 2}, "prompt_tokens": 3, "completion_tokens": 2,
            "output_token_logprobs": [[-1.0, 7, None], [-2.0, 9, None]],
            "routed_experts": base64.b64encode(TRACE.tobytes()).decode()}
    meta.update(meta_overrides)
    return json.dumps({"output_ids": [7, 9], "meta_info": meta}).encode()


class ScriptedServer:
    """Answers each request with the next (status, body, delay_s) of the script; the last entry repeats."""

    def __init__(self, *script: tuple[int, bytes, float]):
        self.script = deque(script)
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, body, delay = outer.script.popleft() if len(outer.script) > 1 else outer.script[0]
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout) and closed the socket
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _client(server: ScriptedServer, **kwargs) -> SGLangClient:
    return SGLangClient(server.url, routing=SPEC, backoff_s=0.01, **{"timeout_s": 5.0, "max_retries": 2, **kwargs})


@pytest.fixture
def serve():
    servers = []

    def start(*script):
        servers.append(ScriptedServer(*script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_500_then_200_is_retried(serve):
    server = serve((500, b"internal", 0.0), (200, _ok(), 0.0))
    (record,) = _client(server).generate([PROMPT], {"max_new_tokens": 2}, return_routed_experts=True, rid_prefix="p")
    assert len(server.bodies) == 2
    assert [body.pop("rid") for body in server.bodies] == ["p-0", "p-0-retry1"]  # a retry never reuses a rid
    assert server.bodies[0] == server.bodies[1] and server.bodies[0]["return_routed_experts"] is True
    np.testing.assert_array_equal(record.routing, TRACE)
    np.testing.assert_array_equal(record.response_ids, [7, 9])


def test_persistent_5xx_fails_after_the_configured_retries(serve):
    server = serve((503, b"busy", 0.0))
    with pytest.raises(RolloutError, match=r"request p-0: failed after 3 attempts .*HTTP 503: busy"):
        _client(server).generate([PROMPT], rid_prefix="p")
    assert len(server.bodies) == 3


def test_timeout_is_a_clear_error_after_the_retries(serve):
    server = serve((200, _ok(), 2.0))
    with pytest.raises(RolloutError, match=r"request p-0: failed after 2 attempts \(timeout 0.2s each\).*Timeout"):
        _client(server, timeout_s=0.2, max_retries=1).generate([PROMPT], rid_prefix="p")
    assert len(server.bodies) == 2


def test_connection_refused_is_retried_then_reported():
    client = SGLangClient("http://127.0.0.1:9", max_retries=1, backoff_s=0.01, timeout_s=2.0)
    with pytest.raises(RolloutError, match=r"request p-0: failed after 2 attempts .*ConnectionError"):
        client.generate([PROMPT], rid_prefix="p")
    assert client.health() is False


def test_client_error_is_not_retried(serve):
    server = serve((400, b'{"error": {"message": "input_ids[0] must hold non-negative int token ids"}}', 0.0))
    with pytest.raises(RolloutError, match="request p-0: HTTP 400: .*non-negative int token ids"):
        _client(server).generate([PROMPT], rid_prefix="p")
    assert len(server.bodies) == 1


@pytest.mark.parametrize("body, error, message", [
    (b'{"output_ids": [7, 9], "meta_info": {', RolloutError, "request p-0: malformed JSON from /generate"),
    (_ok(routed_experts=None), RolloutResponseError, "request p-0: meta_info has no routed_experts"),
    (_ok(routed_experts=base64.b64encode(TRACE.tobytes()).decode()[:-6]), RolloutResponseError,
     "request p-0: routed_experts of sample p-0, all layers, all rows: malformed base64"),
    (_ok(routed_experts=base64.b64encode(TRACE.tobytes()[:-6]).decode()), RolloutResponseError,
     "request p-0: routed_experts of sample p-0, all layers, all rows: wrong dtype: 58 bytes"),
    (_ok(routed_experts=base64.b64encode(TRACE[:3].tobytes()).decode()), RolloutResponseError,
     "request p-0: routed_experts of sample p-0, all layers, row 3: trace for a different sample length"),
    (_ok(output_token_logprobs=[[-1.0, 7, None]]), RolloutResponseError,
     "request p-0: 1 output log-probs for 2 output tokens"),
])
def test_malformed_responses_name_the_request(serve, body, error, message):
    server = serve((200, body, 0.0))
    with pytest.raises(error) as err:
        _client(server).generate([PROMPT], return_routed_experts=True, rid_prefix="p")
    assert message in str(err.value)
    assert len(server.bodies) == 1


def test_one_bad_sample_fails_the_batch_naming_it(serve):
    server = serve((200, _ok(), 0.0), (200, _ok(), 0.0), (200, _ok(output_token_logprobs=[]), 0.0))
    with pytest.raises(RolloutResponseError, match="request p-2: 0 output log-probs for 2"):
        _client(server, max_concurrency=1).generate([PROMPT] * 4, rid_prefix="p")


def test_seeded_requests_carry_distinct_reproducible_sampling_seeds(serve):
    server = serve((200, _ok(), 0.0))
    client = _client(server, max_concurrency=4)
    client.generate([PROMPT, PROMPT], {"temperature": 0.7}, samples_per_prompt=2, seed=3, rid_prefix="a")
    client.generate([PROMPT, PROMPT], {"temperature": 0.7}, samples_per_prompt=2, seed=3, rid_prefix="b")
    seeds = {b["rid"]: b["sampling_params"]["sampling_seed"] for b in server.bodies}
    assert [seeds[f"a-{j}"] for j in range(4)] == [seeds[f"b-{j}"] for j in range(4)]
    assert len({seeds[f"a-{j}"] for j in range(4)}) == 4
    assert all(b["sampling_params"]["temperature"] == 0.7 for b in server.bodies)


def test_sglang_paths_say_what_to_install(monkeypatch):
    assert "sglang" not in sys.modules or sys.modules["sglang"] is not None
    monkeypatch.setitem(sys.modules, "sglang", None)  # import sglang -> ImportError, installed or not
    with pytest.raises(ImportError, match='sglang is not installed: `pip install "sglang\\[all\\]"`'):
        SGLangEngineClient.launch(model_path="/nowhere")
    monkeypatch.setitem(sys.modules, "sglang.srt.utils", None)
    with pytest.raises(ImportError, match="sglang is not installed"):
        SGLangClient("http://127.0.0.1:9").update_weights_from_tensor([])
