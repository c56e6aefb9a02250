"""The RL loop with two CPU engines behind SGLang's protocol: requests spread over both, weights reach both over the
distributed weight sync (the default when the engines serve it), and an engine restarted between steps is found and
given the weights again."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.rollout.hf_engine import HFEngine
from vespo_megatron.rollout.server import RolloutServer
from vespo_megatron.train.config import TrainConfig
from vespo_megatron.train.run import run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_hf_config("qwen3_moe", vocab_size=32)).save_pretrained(path)
    return str(path)


class CountingEngine(HFEngine):
    """Counts /generate bodies and distributed updates; records every version it was set to."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated = self.buckets = 0
        self.versions: list[str] = []

    def handle_generate(self, body):
        self.generated += 1
        return super().handle_generate(body)

    def update_weights_from_distributed(self, *args, **kwargs):
        self.buckets += 1
        return super().update_weights_from_distributed(*args, **kwargs)

    def update_weights_from_tensors(self, named, weight_version=None):
        if weight_version is not None:
            self.versions.append(weight_version)
        return super().update_weights_from_tensors(named, weight_version)


def _engine(hf_dir: str) -> CountingEngine:
    return CountingEngine.from_pretrained(hf_dir, dtype="fp32")


def test_two_engines_distributed_sync_and_a_restart(hf_dir):
    engines = [_engine(hf_dir), _engine(hf_dir)]
    with RolloutServer(engines[0]) as first, RolloutServer(engines[1]) as second:
        cfg = TrainConfig(hf_checkpoint=hf_dir, sglang_url=[first.url, second.url], rollout_batch_size=4,
                          n_samples_per_prompt=2, num_mini_batches=2, micro_batch_size=2, max_new_tokens=4,
                          train_iters=2, engine_dtype="fp32", routing_replay="r3", weight_sync_bucket_mb=1)
        history = run_training(cfg, quiet=True)
        assert [it for it, _ in history] == [0, 1]
        for engine in engines:
            assert engine.generated >= 4 and engine.buckets > 2  # requests spread; bucketed broadcasts
            assert engine.versions == ["v0", "v1", "v2"] and engine.weight_version == "v2"
        assert engines[0].weights_checksum() == engines[1].weights_checksum()

        # an engine restarted between runs/steps is stale: the next trainer finds it and pushes again
        port = int(second.url.rsplit(":", 1)[1])
        second.shutdown()
        fresh = _engine(hf_dir)
        with RolloutServer(fresh, port=port):
            history = run_training(TrainConfig(**{**cfg.__dict__, "train_iters": 1}), quiet=True)
            assert [it for it, _ in history] == [0]
            assert fresh.versions == ["v0", "v1"] and engines[0].weight_version == "v1"
            assert fresh.weights_checksum() == engines[0].weights_checksum()


def test_disk_sync_writes_shards_from_every_owning_rank(hf_dir):
    from pathlib import Path

    engine = _engine(hf_dir)
    with RolloutServer(engine) as server:
        cfg = TrainConfig(hf_checkpoint=hf_dir, sglang_url=[server.url], rollout_batch_size=4, n_samples_per_prompt=2,
                          num_mini_batches=2, micro_batch_size=2, max_new_tokens=4, train_iters=1, engine_dtype="fp32",
                          expert_model_parallel_size=2, weight_sync="disk", weight_sync_bucket_mb=1)
        history = run_training(cfg, world_size=2, quiet=True)
        assert [it for it, _ in history] == [0] and engine.weight_version == "v1"
        files = sorted(p.name for p in Path(engine.model_path).glob("*.safetensors"))
        assert {name.split("-")[1] for name in files} == {"rank00000", "rank00001"}  # each rank wrote its keys
        assert (Path(engine.model_path) / "model.safetensors.index.json").is_file()
