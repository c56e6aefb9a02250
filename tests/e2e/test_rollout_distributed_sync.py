"""Collective weight sync and several engines, end to end against two CPU stand-in servers on 127.0.0.1 (gloo):
a full step (generate -> train -> distributed sync -> version check -> generate), and the faults: an engine dying
mid-rollout, an engine restarted between steps, a sync interrupted midway."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from vespo_megatron.hf_config import moe_layers, num_experts, tiny_hf_config
from vespo_megatron.rollout.engines import EnginePool
from vespo_megatron.rollout.hf_engine import HFEngine
from vespo_megatron.rollout.server import RolloutServer
from vespo_megatron.rollout.client import RolloutError
from vespo_megatron.rollout.sglang import SGLangClient
from vespo_megatron.rollout.weight_sync import DistributedSync, Probe, WeightSyncError, nbytes, verify_weights
from vespo_megatron.routing.trace import TraceSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CONFIG = tiny_hf_config("qwen3_moe", mlp_only_layers=[2])
SPEC = TraceSpec.from_layer_pattern(moe_layers(CONFIG), num_experts(CONFIG), CONFIG.num_experts_per_tok)
PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(0, 256, size=3 + i % 5)] for i in range(6)]
PROBE = [9, 1, 250, 33, 33, 7, 120, 64, 5]
BUCKET = 96 << 10  # several buckets for the tiny model


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIG).eval()


def _probe(model: torch.nn.Module) -> Probe:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROBE])).logits[0, :-1].float()
    return Probe(PROBE, torch.log_softmax(logits, -1).gather(-1, torch.tensor(PROBE[1:])[:, None])[:, 0].numpy(),
                 atol=1e-5)


def _serve(port: int = 0) -> RolloutServer:
    return RolloutServer(HFEngine.from_model(_model(0), dtype="fp32", model_path="tiny"), port=port).start()


@pytest.fixture
def two_engines():
    servers = [_serve(), _serve()]
    yield servers
    for server in servers:
        try:
            server.shutdown()
        except OSError:
            pass


def _digests(model: torch.nn.Module) -> dict:
    return HFEngine.from_model(model, dtype="fp32").weights_checksum()


def test_full_step_with_two_engines(two_engines):
    pool = EnginePool([s.url for s in two_engines], routing=SPEC)
    sync = DistributedSync(pool, bucket_bytes=BUCKET)
    policy = _model(0).train()
    records = pool.generate(PROMPTS, {"max_new_tokens": 6}, samples_per_prompt=2, seed=1, return_routed_experts=True)
    assert {r.weight_version for r in records} == {"default"} and len(records) == 12
    # train: one step of the rollout log-likelihood (REINFORCE with reward 1), on the trainer's copy
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    loss = 0.0
    for record in records:
        tokens = torch.tensor(np.concatenate([record.prompt_ids, record.response_ids]))[None]
        logits = policy(input_ids=tokens).logits[0, len(record.prompt_ids) - 1:-1]
        loss = loss - torch.log_softmax(logits, -1).gather(-1, tokens[0, len(record.prompt_ids):, None]).sum()
    (loss / len(records)).backward()
    optimizer.step()
    policy.eval()
    sent = sync.push(policy.named_parameters(), "v1")
    assert sent == sum(nbytes(p) for p in policy.parameters())
    for client in pool.clients:  # version check, then the engine's log-probs of a probe are the trained model's
        verify_weights(client, version="v1", probe=_probe(policy))
    assert all(s.engine.weights_checksum() == _digests(policy) for s in two_engines)
    after = pool.generate(PROMPTS[:2], {"max_new_tokens": 4}, samples_per_prompt=2, seed=1)
    assert {r.weight_version for r in after} == {"v1"}
    sync.close()


def test_interrupted_sync_leaves_the_old_version_and_no_generation(two_engines):
    pool = EnginePool([s.url for s in two_engines], routing=SPEC)
    sync = DistributedSync(pool, bucket_bytes=BUCKET)
    trained = _model(1)

    def dies_midway():
        for i, item in enumerate(trained.named_parameters()):
            if i == len(list(trained.parameters())) // 2:
                raise RuntimeError("trainer killed mid-sync")
            yield item

    with pytest.raises(RuntimeError, match="trainer killed mid-sync"):
        sync.push(dies_midway(), "v1")
    assert pool.versions() == {s.url: "default" for s in two_engines}  # unchanged until the last bucket
    # the engines stay paused: a half-updated model serves nothing
    held = SGLangClient(two_engines[0].url, timeout_s=1.0, max_retries=0)
    with pytest.raises(RolloutError, match="Timeout"):
        held.generate([PROMPTS[0]], {"max_new_tokens": 2})
    assert sync.ensure(trained.named_parameters, "v1") == [s.url for s in two_engines]
    assert all(s.engine.weights_checksum() == _digests(trained) for s in two_engines)
    assert {r.weight_version for r in pool.generate(PROMPTS[:2], {"max_new_tokens": 2})} == {"v1"}
    sync.close()


def test_sync_interrupted_inside_a_bucket_fails_fast(two_engines):
    """A broadcast that fails inside a bucket (the trainer's device lost, an engine gone): the engines waiting for
    the rest of the bucket fail at once (the group is closed), not at the group / request timeout (120 s here); the
    error names the tensor; versions unchanged, generation paused; the next ensure() rebuilds the group and re-pushes."""
    pool = EnginePool([s.url for s in two_engines], routing=SPEC)
    timeout_s = 120.0
    sync = DistributedSync(pool, bucket_bytes=BUCKET, timeout_s=timeout_s)
    trained = _model(1)
    sync.connect()
    broadcast, calls = sync.group.broadcast, []

    def fails_on_the_third(tensor, src=0):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        broadcast(tensor, src)

    sync.group.broadcast = fails_on_the_third
    names = [name for name, _ in trained.named_parameters()]
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=rf"inside a bucket, after 2 of \d+ tensors \(at '{names[2]}'\): device lost"):
        sync.push(trained.named_parameters(), "v1")
    assert time.monotonic() - start < timeout_s / 4  # the engines' receive ended when the group closed
    assert sync.group is None
    assert pool.versions() == {s.url: "default" for s in two_engines}
    assert sync.ensure(trained.named_parameters, "v1") == [s.url for s in two_engines]
    assert all(s.engine.weights_checksum() == _digests(trained) for s in two_engines)
    assert {r.weight_version for r in pool.generate(PROMPTS[:2], {"max_new_tokens": 2})} == {"v1"}
    sync.close()


def test_engine_restarted_between_steps_is_detected_and_repushed(two_engines):
    pool = EnginePool([s.url for s in two_engines], routing=SPEC)
    sync = DistributedSync(pool, bucket_bytes=BUCKET)
    trained = _model(1)
    sync.push(trained.named_parameters(), "v1")
    assert sync.ensure(trained.named_parameters, "v1") == []  # nothing stale: nothing sent
    port = int(two_engines[1].url.rsplit(":", 1)[1])
    two_engines[1].shutdown()
    two_engines[1] = _serve(port)  # same URL, fresh engine at its launch weights and version
    assert pool.versions()[two_engines[1].url] == "default"
    assert sync.ensure(trained.named_parameters, "v1") == [two_engines[1].url]
    assert pool.get_weight_version() == "v1"
    assert all(s.engine.weights_checksum() == _digests(trained) for s in two_engines)
    sync.close()


def test_engine_dying_mid_rollout_is_retried_then_named(two_engines):
    dying = two_engines[1]
    served = dying.engine.handle_generate
    calls = []

    def die_after_first(body):
        calls.append(1)
        if len(calls) == 1:
            threading.Thread(target=dying.shutdown, daemon=True).start()  # the engine process goes away
        return served(body)

    dying.engine.handle_generate = die_after_first
    pool = EnginePool([s.url for s in two_engines], routing=SPEC, max_retries=2, backoff_s=0.05, timeout_s=10.0,
                      max_concurrency=1)
    with pytest.raises(RolloutError) as err:
        pool.generate(PROMPTS, {"max_new_tokens": 3})
    message = str(err.value)
    assert f"engine {dying.url}" in message and "failed after 3 attempts" in message
    assert two_engines[0].url not in message.split("engines:")[-1]  # the healthy engine is not blamed
