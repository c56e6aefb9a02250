"""Weight sync to the rollout engine (tensor and disk paths) and the checks that it holds the trainer's weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.rollout.hf_engine import HFEngine
from vespo_megatron.rollout.client import RolloutError
from vespo_megatron.rollout.engine_client import SGLangEngineClient
from vespo_megatron.rollout.weight_sync import Probe, WeightSyncError, push_weights, verify_weights

TOKENS = [9, 1, 250, 33, 33, 7, 120, 64, 5]


def _model(family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_hf_config(family)).eval()


def _probe(model: torch.nn.Module) -> Probe:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([TOKENS])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(TOKENS[1:])[:, None])[:, 0]
    return Probe(TOKENS, logprobs.numpy(), atol=1e-5)


@pytest.fixture(params=["qwen3_moe", "mixtral"])
def family(request) -> str:
    return request.param


def test_tensor_path_then_all_checks_pass(family):
    trained = _model(family, seed=1)
    client = SGLangEngineClient(HFEngine.from_model(_model(family, seed=2), dtype="fp32"))
    named = list(trained.named_parameters())
    with pytest.raises(WeightSyncError, match=r"tensors differ on the engine"):
        verify_weights(client, named_tensors=named)
    with pytest.raises(WeightSyncError, match="probe log-probs differ"):
        verify_weights(client, probe=_probe(trained))
    push_weights(client, named, "step-3")
    verify_weights(client, version="step-3", named_tensors=named, probe=_probe(trained))
    with pytest.raises(WeightSyncError, match="weight version 'step-3', expected 'step-4'"):
        verify_weights(client, version="step-4")


def test_disk_path_with_checkpoint_names(family, tmp_path):
    trained = _model(family, seed=1)
    trained.save_pretrained(tmp_path / "saved")
    named = list(load_file(tmp_path / "saved" / "model.safetensors").items())  # per-expert checkpoint names
    client = SGLangEngineClient(HFEngine.from_model(_model(family, seed=2), dtype="fp32"))
    push_weights(client, named, "step-1", via="disk", hf_config=trained.config, staging_dir=tmp_path / "sync")
    verify_weights(client, version="step-1", named_tensors=named, probe=_probe(trained))


def test_a_tensor_the_engine_lost_is_named():
    trained = _model("qwen3_moe", seed=1)
    engine = HFEngine.from_model(_model("qwen3_moe", seed=2), dtype="bf16")
    client = SGLangEngineClient(engine)
    named = list(trained.named_parameters())
    push_weights(client, named, "v")
    verify_weights(client, named_tensors=named)  # digests compare after the cast to the engine's bf16
    with pytest.raises(WeightSyncError, match="probe log-probs differ"):  # a bf16 engine is not the fp32 trainer
        verify_weights(client, probe=_probe(trained))
    with torch.no_grad():
        engine.model.model.layers[3].mlp.experts.down_proj[6, 0, 0] += 1.0
    with pytest.raises(WeightSyncError, match=r"1 of \d+ tensors differ .*'model.layers.3.mlp.experts.down_proj'"):
        verify_weights(client, named_tensors=named)


def test_misuse_is_refused():
    client = SGLangEngineClient(HFEngine.from_model(_model("qwen3_moe", seed=2), dtype="fp32"))
    with pytest.raises(ValueError, match="at least one of version, named_tensors, probe"):
        verify_weights(client)
    with pytest.raises(ValueError, match=r"via must be one of \['distributed', 'disk', 'tensor'\]"):
        push_weights(client, [], "v", via="nccl")
    with pytest.raises(ValueError, match="needs hf_config and staging_dir"):
        push_weights(client, [], "v", via="disk")
    with pytest.raises(WeightSyncError, match="the engine scored 3 tokens, the trainer 2"):
        verify_weights(client, probe=Probe([1, 2, 3, 4], np.zeros(2)))
    with pytest.raises(RolloutError, match="object reports no weight digests: verify with a probe"):
        SGLangEngineClient(object()).weights_checksum()
