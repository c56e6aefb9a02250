"""The rollout client and the CPU stand-in against SGLang 0.5.23 itself (its wheel's source, see sglang_release.py):
every route either uses exists with that method in the release's route table, every request the client can build
passes the release's request types (GenerateReqInput with its normalisation and the /generate JSON contract; the
weight-update and control request Structs, unknown fields refused), the stand-in's request fields and defaults are
the release's, its /generate answers pass the release's response contract, and every response field the client
reads is produced by the release (file:line found and reported)."""
from __future__ import annotations

import base64
import sys
import types
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.contract import sglang_release as release
from vespo_megatron.hf_config import moe_layers, num_experts, tiny_hf_config
from vespo_megatron.rollout import server as stand_in
from vespo_megatron.rollout.hf_engine import HFEngine
from vespo_megatron.rollout.server import RolloutServer
from vespo_megatron.rollout.engine_client import SGLangEngineClient
from vespo_megatron.rollout.sglang import SGLangClient
from vespo_megatron.routing.trace import TraceSpec

CONFIG = tiny_hf_config("qwen3_moe", mlp_only_layers=[1])
SPEC = TraceSpec.from_layer_pattern(moe_layers(CONFIG), num_experts(CONFIG), CONFIG.num_experts_per_tok)
_ROWS = np.zeros((3 + 2 - 1, CONFIG.num_hidden_layers, 2), "<i4")  # prompt 3 + output 2 − 1 rows
_ROWS[:, list(SPEC.moe_layers)] = [0, 1]

# Every response field the client reads, and where the release produces it (file, text on that line).
RESPONSE_FIELDS = {
    "output_ids": (release.TOKENIZER_MANAGER, '"output_ids": state.output_ids.copy(),'),
    "meta_info.id": (release.TOKENIZER_MANAGER, '"id": rid,'),
    "meta_info.finish_reason": (release.TOKENIZER_MANAGER, '"finish_reason": recv_obj.finished_reasons[i],'),
    "meta_info.weight_version": (release.TOKENIZER_MANAGER, '"weight_version": self.config_value("weight_version"),'),
    "meta_info.output_token_logprobs": (release.TOKENIZER_MANAGER,
                                        'meta_info["output_token_logprobs"] = state.output_token_logprobs'),
    "meta_info.input_token_logprobs": (release.TOKENIZER_MANAGER,
                                       'meta_info["input_token_logprobs"] = state.input_token_logprobs'),
    "meta_info.routed_experts": (release.TOKENIZER_MANAGER, 'meta_info["routed_experts"] = val'),
    "/model_info weight_version": (release.HTTP_SERVER, '"weight_version": _global_state.tokenizer_manager.config_value('),
    "/server_info <ServerArgs fields> (tp_size, enable_deterministic_inference)": (
        release.HTTP_SERVER, "**build_server_info(server_args, _global_state.scheduler_info),"),
    "weight updates success/message": (release.HTTP_SERVER, 'content = {"success": success, "message": message}'),
    "/flush_cache status 200 | 400": (release.HTTP_SERVER, "status_code=200 if ret.success else HTTPStatus.BAD_REQUEST,"),
}


class _Response:
    def __init__(self, status: int, body: Any):
        self.status_code, self._body = status, body
        self.text = "" if body is None else str(body)

    def json(self) -> Any:
        return self._body


class RecordingSession:
    """Stands in for requests.Session: records (method, path, body) and answers as the release would."""

    def __init__(self):
        self.calls: list[tuple[str, str, Any]] = []

    def request(self, method: str, url: str, json: Any = None, timeout: float = 0) -> _Response:
        path = "/" + url.split("/", 3)[3]
        self.calls.append((method, path, json))
        if path == "/generate":
            meta = {"id": json["rid"], "finish_reason": {"type": "length", "length": 2}, "prompt_tokens": 3,
                    "weight_version": "v1", "completion_tokens": 2,
                    "output_token_logprobs": [[-1.0, 7, None], [-2.0, 9, None]],
                    "input_token_logprobs": [[None, 1, None], [-1.0, 2, None], [-1.0, 3, None]],
                    "routed_experts": base64.b64encode(_ROWS[json.get("routed_experts_start_len", 0):]).decode()}
            return _Response(200, {"output_ids": [7, 9], "meta_info": meta})
        answers = {"/model_info": {"weight_version": "v1"},
                   "/server_info": {"tp_size": 2, "enable_deterministic_inference": True},
                   "/pause_generation": {"message": "Generation paused successfully.", "status": "ok"},
                   "/continue_generation": {"message": "Generation continued successfully.", "status": "ok"},
                   "/abort_request": None, "/flush_cache": "Cache flushed.\n"}
        return _Response(200, answers.get(path, {"success": True, "message": "ok"}))

    def get(self, url: str, timeout: float = 0) -> _Response:
        return self.request("GET", url)


@pytest.fixture(scope="module")
def recorded() -> RecordingSession:
    """Every request kind the HTTP client builds, recorded."""
    session = RecordingSession()
    client = SGLangClient("http://engine:30000", routing=SPEC)
    client._session = lambda: session
    client.generate([[1, 2, 3]], {"max_new_tokens": 2, "temperature": 0.7, "stop_token_ids": [5]}, seed=3,
                    return_routed_experts=True)
    client.generate([[1, 2, 3], [4, 5, 6]], samples_per_prompt=2, return_routed_experts=True,
                    routed_experts_start_len=1)
    client.score([1, 2, 3])
    client.health()
    client.get_weight_version()
    client.get_server_info()
    client.update_weights_from_disk("/ckpt", weight_version="v2")
    serializer = types.SimpleNamespace(serialize=lambda obj, output_str=False: base64.b64encode(b"ipc").decode())
    utils = types.ModuleType("sglang.srt.utils")
    utils.MultiprocessingSerializer = serializer
    saved = {name: sys.modules.get(name) for name in ("sglang", "sglang.srt", "sglang.srt.utils")}
    sys.modules.update({"sglang": types.ModuleType("sglang"), "sglang.srt": types.ModuleType("sglang.srt"),
                        "sglang.srt.utils": utils})
    try:
        client.update_weights_from_tensor([("w", torch.zeros(2))], weight_version="v3")
    finally:
        for name, module in saved.items():
            sys.modules.pop(name) if module is None else sys.modules.__setitem__(name, module)
    client.init_weights_update_group("10.0.0.1", 29500, 1, 3, "weight_update_group", "nccl")
    client.update_weights_from_distributed(["a", "b"], ["bfloat16", "float32"], [[2, 3], [4]],
                                           weight_version="v4", flush_cache=True)
    client.update_weights_from_distributed(["c"], ["bfloat16"], [[1]], flush_cache=False)
    client.destroy_weights_update_group()
    client.update_weight_version("v5")
    client.pause_generation("retract")
    client.continue_generation()
    client.abort_request("r1")
    client.abort_request(abort_all=True)
    client.flush_cache()
    return session


@pytest.fixture(scope="module")
def served() -> RolloutServer:
    torch.manual_seed(0)
    engine = HFEngine.from_model(AutoModelForCausalLM.from_config(CONFIG), dtype="fp32", model_path="tiny")
    return RolloutServer(engine)


def test_the_release_route_table_was_read():
    table = release.routes()
    assert ("POST", "/generate") in table and ("PUT", "/generate") in table and ("GET", "/flush_cache") in table
    assert ("GET", "/get_weight_version") not in table and ("POST", "/get_weights_checksum") not in table
    assert table[("POST", "/update_weights_from_distributed")] == "UpdateWeightsFromDistributedReqInput"


def test_every_route_the_client_calls_exists_in_the_release(recorded):
    used = {(method, path) for method, path, _ in recorded.calls}
    assert {("GET", "/model_info"), ("GET", "/server_info"), ("POST", "/update_weights_from_distributed")} <= used
    missing = sorted(used - set(release.routes()))
    assert not missing, f"routes the client calls that SGLang {release.VERSION} lacks: {missing}"


def test_every_route_the_stand_in_serves_exists_in_the_release(served):
    missing = sorted(set(served._routes) - set(release.routes()))
    assert not missing, f"routes the stand-in serves that SGLang {release.VERSION} lacks: {missing}"


def test_generate_bodies_pass_the_release_contract_and_normalisation(recorded):
    bodies = [body for _, path, body in recorded.calls if path == "/generate"]
    assert len(bodies) == 1 + 4 + 1 and any(b["sampling_params"].get("sampling_seed") for b in bodies)
    module = release.io_struct()
    for body in bodies:
        release.api_types().GenerateRequest.from_json_value(body)  # api_contract.py's gate on every /generate body
        request = module.GenerateReqInput(**body)  # a field the release lacks is a TypeError here
        request.normalize_batch_and_arguments()
        assert request.is_single and request.rid == body["rid"]
    with pytest.raises(Exception, match="unknown field `seed`"):  # the contract refuses what the release lacks
        release.api_types().GenerateRequest.from_json_value({"input_ids": [1], "sampling_params": {"seed": 1}})


def test_control_bodies_are_valid_release_requests(recorded):
    checked = set()
    for method, path, body in recorded.calls:
        if path == "/generate" or method == "GET":
            continue
        if path == "/flush_cache":  # no body: its only parameter is the `timeout` query
            assert body is None
            continue
        msgspec.convert(body, release.request_type(path, method))  # raises on a wrong type or unknown field
        checked.add(path)
    assert len(checked) == 9
    tensor_body = next(body for _, path, body in recorded.calls if path == "/update_weights_from_tensor")
    assert len(tensor_body["serialized_named_tensors"]) == 2  # one payload per TP rank (server tp_size 2)
    with pytest.raises(msgspec.ValidationError, match="Object contains unknown field `nope`"):
        msgspec.convert({"new_version": "v", "nope": 1}, release.request_type("/update_weight_version"))


def test_stand_in_request_fields_and_defaults_are_the_releases():
    for path, fields in stand_in._FIELDS.items():
        struct = release.request_type(path)
        real = {f.name: f for f in msgspec.structs.fields(struct)}
        for name, (_, default) in fields.items():
            assert name in real, f"{path}: the stand-in reads {name!r}, which {struct.__name__} lacks"
            if default is stand_in.REQUIRED:
                assert real[name].required, f"{path}: {name!r} is optional in the release"
            else:
                assert not real[name].required and real[name].default == default, (path, name, real[name].default)
        required = {name for name, f in real.items() if f.required}
        assert required <= set(fields), f"{path}: the release requires {required - set(fields)}"


def test_stand_in_generate_answers_pass_the_release_response_contract(served):
    api = release.api_types()
    body = {"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {"max_new_tokens": 3, "n": 2},
            "return_logprob": True, "logprob_start_len": 1, "return_routed_experts": True}
    for response in served.engine.handle_generate(body):
        decoded = api.GenerateResponse.from_json_value(response)
        assert decoded.output_ids == response["output_ids"] and decoded.meta_info.id == response["meta_info"]["id"]
        assert decoded.meta_info.input_token_logprobs[0].logprob is None  # at position logprob_start_len


@pytest.mark.parametrize("field", sorted(RESPONSE_FIELDS))
def test_every_response_field_the_client_reads_is_produced_by_the_release(field):
    path, needle = RESPONSE_FIELDS[field]
    line = release.line_of(path, needle)
    assert line > 0, f"{field}: {path}:{line}"


def test_engine_client_calls_match_the_release_engine_signatures():
    methods = release.engine_methods()
    calls: list[tuple[str, tuple, dict]] = []

    class FakeEngine:
        """Records calls; answers with the release's return shapes."""

        loop = types.SimpleNamespace(run_until_complete=lambda awaitable: awaitable)

        def __init__(self):
            self.tokenizer_manager = types.SimpleNamespace(update_weight_version=self._record("tm_version", None))
            self.generate = self._record("generate", None)
            self.update_weights_from_disk = self._record("update_weights_from_disk", (True, "ok", 0))
            self.update_weights_from_tensor = self._record("update_weights_from_tensor", (True, "ok"))
            self.get_model_info = self._record("get_model_info", {"weight_version": "v1"})
            self.get_server_info = self._record("get_server_info", {"enable_deterministic_inference": True})

        @staticmethod
        def _record(name: str, answer: Any):
            def call(*args: Any, **kwargs: Any) -> Any:
                calls.append((name, args, kwargs))
                return answer
            return call

    client = SGLangEngineClient(FakeEngine())
    module = release.io_struct()
    saved = {name: sys.modules.get(name) for name in ("sglang", "sglang.srt", "sglang.srt.managers",
                                                      "sglang.srt.managers.io_struct")}
    sys.modules.update({"sglang": types.ModuleType("sglang"), "sglang.srt": types.ModuleType("sglang.srt"),
                        "sglang.srt.managers": types.ModuleType("m"), "sglang.srt.managers.io_struct": module})
    try:
        client.update_weights_from_disk("/ckpt", weight_version="v2")
        client.update_weights_from_tensor([("w", torch.zeros(1))], weight_version="v3")
        client.get_weight_version()
        client.get_server_info()
    finally:
        for name, saved_module in saved.items():
            sys.modules.pop(name) if saved_module is None else sys.modules.__setitem__(name, saved_module)
    with pytest.raises(Exception):  # generate is answered with None by the fake: only its arguments matter here
        client.generate([[1, 2]], {"max_new_tokens": 1}, return_routed_experts=False)
    for name, args, kwargs in calls:
        if name == "tm_version":  # the version bump /update_weight_version sends (no Engine method for it)
            (request,) = args
            assert type(request).__name__ == "UpdateWeightVersionReqInput" and request.new_version in ("v2", "v3")
            assert release.line_of("sglang/srt/managers/tokenizer_control_mixin.py", "async def update_weight_version")
            continue
        params = methods[name]
        assert len(args) <= len(params), f"Engine.{name} takes {params}, called with {len(args)} positionals"
        unknown = set(kwargs) - set(params)
        assert not unknown, f"Engine.{name}({', '.join(params)}) has no {sorted(unknown)}"
    assert {name for name, _, _ in calls} >= {"generate", "update_weights_from_disk", "update_weights_from_tensor",
                                              "tm_version"}
