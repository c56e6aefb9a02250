"""The SGLang client end to end against the CPU engine served over SGLang's HTTP protocol on 127.0.0.1."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vespo_megatron.hf_config import num_experts, tiny_hf_config
from vespo_megatron.megatron.model import moe_layer_pattern
from vespo_megatron.rollout.hf_engine import HFEngine
from vespo_megatron.rollout.server import RolloutServer
from vespo_megatron.rollout.client import RolloutError
from vespo_megatron.rollout.engine_client import SGLangEngineClient
from vespo_megatron.rollout.sglang import SGLangClient
from vespo_megatron.rollout.weight_sync import push_weights, verify_weights
from vespo_megatron.routing.trace import TraceSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CONFIG = tiny_hf_config("qwen3_moe", mlp_only_layers=[2])
SPEC = TraceSpec.from_layer_pattern(moe_layer_pattern(CONFIG), num_experts(CONFIG), CONFIG.num_experts_per_tok)
SAMPLING = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.95}
PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(0, 256, size=3 + i % 7)] for i in range(16)]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIG).eval()


@pytest.fixture(scope="module")
def server():
    engine = HFEngine.from_model(_model(0), dtype="bf16", model_path="tiny-qwen3-moe")
    with RolloutServer(engine) as running:
        yield running


def _generate(client, seed: int = 7, prompts=PROMPTS):
    return client.generate(prompts, SAMPLING, samples_per_prompt=4, seed=seed, return_routed_experts=True)


def _same(a, b) -> bool:
    return all(np.array_equal(x.response_ids, y.response_ids) and np.array_equal(x.logprobs, y.logprobs)
               and np.array_equal(x.routing, y.routing) for x, y in zip(a, b, strict=True))


def test_64_concurrent_requests_complete_validate_and_are_deterministic(server):
    assert server.url.startswith("http://127.0.0.1:")
    client = SGLangClient(server.url, routing=SPEC, max_concurrency=64)
    assert client.health()
    records = _generate(client)
    assert len(records) == 64
    moe = np.array(moe_layer_pattern(CONFIG), dtype=bool)
    for j, record in enumerate(records):
        np.testing.assert_array_equal(record.prompt_ids, PROMPTS[j // 4])
        n = len(record.response_ids)
        assert record.finish_reason["type"] in ("stop", "length") and 1 <= n <= 10
        assert record.logprobs.shape == (n,) and np.isfinite(record.logprobs).all() and (record.logprobs <= 0).all()
        routing = record.routing
        assert routing.shape == (len(record.prompt_ids) + n - 1, SPEC.num_hf_layers, SPEC.topk)
        assert (routing[:, ~moe] == 0).all()
        moe_rows = routing[:, moe]
        assert ((moe_rows >= 0) & (moe_rows < SPEC.num_experts)).all()
        assert (moe_rows[..., 0] != moe_rows[..., 1]).all()  # k distinct experts per row
        assert record.weight_version == "default"
    assert len({tuple(r.response_ids) for r in records}) > 32  # samples of one prompt differ
    # same seed: same records, whatever the concurrency; and the in-process engine path agrees bit for bit
    assert _same(records, _generate(SGLangClient(server.url, routing=SPEC, max_concurrency=3)))
    assert _same(records, _generate(SGLangEngineClient(server.engine, routing=SPEC)))
    assert not _same(records[:4], _generate(client, seed=8, prompts=PROMPTS[:1]))


def test_protocol_endpoints_and_errors(server):
    for path in ("/model_info", "/get_model_info"):
        info = requests.get(server.url + path, timeout=5).json()
        assert info["model_path"] == "tiny-qwen3-moe" and info["is_generation"] is True
    batch = requests.post(server.url + "/generate", timeout=5, json={
        "input_ids": [[1, 2], [3]], "sampling_params": {"max_new_tokens": 2}, "rid": "b", "unknown_key": 1}).json()
    assert [item["meta_info"]["id"] for item in batch] == ["b_0", "b_1"]
    parallel = requests.post(server.url + "/generate", timeout=5, json={
        "input_ids": [[1, 2], [3]], "sampling_params": {"max_new_tokens": 2, "n": 2}, "rid": ["p", "q"]}).json()
    assert len({item["meta_info"]["id"] for item in parallel} - {"p", "q"}) == 4  # n > 1: a fresh uuid per sample
    assert "text" not in batch[0]
    for path in ("/get_weight_version", "/get_weights_checksum"):  # not SGLang 0.5.23 routes
        assert requests.post(server.url + path, json={}, timeout=5).status_code == 404
    invalid = requests.post(server.url + "/update_weight_version", json={}, timeout=5)
    assert invalid.status_code == 400 and invalid.json()["message"] == "body.new_version: Field required"
    refused = requests.post(server.url + "/generate", json={"text": "hello"}, timeout=5)
    assert refused.status_code == 400 and "send input_ids" in refused.json()["error"]["message"]
    assert requests.post(server.url + "/generate", data=b"{", timeout=5).status_code == 400
    assert requests.get(server.url + "/nope", timeout=5).status_code == 404
    assert requests.get(server.url + "/health_generate", timeout=5).status_code == 200
    tensor_update = requests.post(server.url + "/update_weights_from_tensor", json={"serialized_named_tensors": []},
                                  timeout=5)
    assert tensor_update.status_code == 400 and "/update_weights_from_disk" in tensor_update.json()["message"]
    with pytest.raises(RolloutError, match=r"request bad-0: HTTP 400: .*token id 999 >= vocab size 256"):
        SGLangClient(server.url).generate([[999]], rid_prefix="bad")


def test_weight_sync_from_disk_reaches_the_engine(server, tmp_path):
    trained = _model(1)
    trained.save_pretrained(tmp_path / "saved")
    named = list(load_file(tmp_path / "saved" / "model.safetensors").items())
    client = SGLangClient(server.url, routing=SPEC)
    push_weights(client, named, "step-1", via="disk", hf_config=CONFIG, staging_dir=tmp_path / "sync",
                 shard_bytes=200_000)
    try:
        assert len(list((tmp_path / "sync").glob("model-rank00000-*.safetensors"))) > 1  # sharded, with an index
        verify_weights(client, version="step-1")
        assert server.engine.weights_checksum() == HFEngine.from_model(trained, dtype="bf16").weights_checksum()
        (record,) = client.generate([PROMPTS[0]], {"max_new_tokens": 2})
        assert record.weight_version == "step-1"
        with pytest.raises(RolloutError, match="update_weights_from_disk.*HTTP 400.*cannot load"):
            client.update_weights_from_disk(str(tmp_path / "missing"))
    finally:  # give the module's server its original weights back
        push_weights(client, _model(0).named_parameters(), "default", via="disk", hf_config=CONFIG,
                     staging_dir=tmp_path / "orig")


def test_serve_cli_on_loopback(tmp_path):
    _model(0).save_pretrained(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vespo_megatron.cli", "serve", "--model-path", str(tmp_path),
                             "--port", "0", "--dtype", "fp32", "--enable-return-routed-experts"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = re.search(r"at (http://127\.0\.0\.1:\d+)", proc.stdout.readline()).group(1)
        client = SGLangClient(url, routing=SPEC, require_deterministic=True)
        with pytest.raises(RolloutError, match="needs the server started with --enable-deterministic-inference"):
            client.generate([[1, 2, 3]], {"max_new_tokens": 3}, seed=0)
        (record,) = SGLangClient(url, routing=SPEC).generate([[1, 2, 3]], {"max_new_tokens": 3}, seed=0,
                                                              return_routed_experts=True)
        assert record.routing.shape == (3 + len(record.response_ids) - 1, 4, 2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
