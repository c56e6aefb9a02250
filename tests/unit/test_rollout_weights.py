"""Engine weight updates (HF checkpoint tensors, in-memory tensors, disk) and the per-tensor digest check."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.rollout.hf_engine import HFEngine
from vespo_megatron.rollout.engine_client import SGLangEngineClient
from vespo_megatron.rollout.weight_names import canonical_name, mismatched_weights

TOKENS = [5, 9, 200, 31, 77, 3, 18, 64]


def _model(family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_hf_config(family)).eval()


def _logprobs(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def saved(request, tmp_path_factory):
    """(family, trained model, its HF directory, its checkpoint tensors by on-disk name)."""
    model = _model(request.param, seed=1)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path, load_file(path / "model.safetensors")


def test_checkpoint_tensors_reach_the_engine_bitwise(saved):
    family, trained, _, tensors = saved
    if family == "mixtral":  # transformers writes Mixtral experts under the legacy names
        assert any(".block_sparse_moe.experts.0.w1.weight" in name for name in tensors)
    engine = HFEngine.from_model(_model(family, seed=2), dtype="fp32")
    assert set(engine.weights_checksum()) == {canonical_name(name) for name in tensors}
    assert mismatched_weights(tensors.items(), engine.weights_checksum())  # different weights before the update
    client = SGLangEngineClient(engine)
    assert not torch.allclose(torch.from_numpy(client.score(TOKENS)), _logprobs(trained, TOKENS))
    assert engine.update_weights_from_tensors(tensors.items(), weight_version="step-1") == len(tensors)
    assert mismatched_weights(tensors.items(), engine.weights_checksum()) == []
    assert engine.weight_version == "step-1"
    torch.testing.assert_close(torch.from_numpy(client.score(TOKENS)), _logprobs(trained, TOKENS), atol=1e-5, rtol=0)


def test_in_memory_names_and_bf16_digests(saved):
    family, trained, _, tensors = saved
    engine = HFEngine.from_model(_model(family, seed=2), dtype="bf16")
    SGLangEngineClient(engine).update_weights_from_tensor(trained.named_parameters())  # fused in-memory names
    held = engine.weights_checksum()
    assert all(entry["dtype"] == "bfloat16" for entry in held.values())
    assert mismatched_weights(tensors.items(), held) == []  # fp32 sent, compared after the same bf16 cast


def test_update_from_disk_and_refusals(saved, tmp_path):
    family, _, path, tensors = saved
    engine = HFEngine.from_model(_model(family, seed=2), dtype="fp32")
    assert engine.update_weights_from_disk(str(path)) == (True, "Succeeded to update model weights.", 0)
    engine.update_weight_version("v7")  # sglang.Engine's disk update takes no version (0.5.23 engine.py:1702)
    assert mismatched_weights(tensors.items(), engine.weights_checksum()) == [] and engine.weight_version == "v7"
    ok, message, _ = engine.update_weights_from_disk(str(tmp_path / "missing"))
    assert not ok and "cannot load" in message
    other = "mixtral" if family == "qwen3_moe" else "qwen3_moe"
    _model(other, seed=0).save_pretrained(tmp_path / other)
    ok, message, _ = engine.update_weights_from_disk(str(tmp_path / other))
    assert not ok and "the engine serves" in message
    assert engine.weight_version == "v7"


def test_bad_tensors_are_rejected_before_anything_is_written():
    engine = HFEngine.from_model(_model("qwen3_moe", seed=2), dtype="fp32")
    before = engine.weights_checksum()
    good = ("model.norm.weight", torch.zeros(64))
    cases = [
        ([good, ("model.layers.0.mlp.experts.0.up_proj.weight", torch.zeros(3, 64))],
         "weight 'model.layers.0.mlp.experts.0.up_proj.weight': shape (3, 64) != engine (32, 64)"),
        ([good, ("model.layers.9.self_attn.q_proj.weight", torch.zeros(64, 64))],
         "weight 'model.layers.9.self_attn.q_proj.weight' matches no parameter of the engine"),
        ([good, ("model.layers.1.mlp.experts.8.down_proj.weight", torch.zeros(64, 32))], "expert 8 out of range"),
    ]
    for named, message in cases:
        with pytest.raises(ValueError) as err:
            engine.update_weights_from_tensors(named)
        assert message in str(err.value)
        ok, reply = engine.update_weights_from_tensor(named)
        assert not ok and message in reply
    assert engine.weights_checksum() == before


def test_expert_slices_follow_the_fused_layout():
    engine = HFEngine.from_model(_model("mixtral", seed=2), dtype="fp32")
    gate, up, down = torch.full((32, 64), 1.0), torch.full((32, 64), 2.0), torch.full((64, 32), 3.0)
    engine.update_weights_from_tensors([("model.layers.2.block_sparse_moe.experts.5.w1.weight", gate),
                                        ("model.layers.2.block_sparse_moe.experts.5.w3.weight", up),
                                        ("model.layers.2.block_sparse_moe.experts.5.w2.weight", down)])
    experts = engine.model.model.layers[2].mlp.experts
    assert torch.equal(experts.gate_up_proj[5], torch.cat([gate, up]))
    assert torch.equal(experts.down_proj[5], down)
    assert not torch.equal(experts.gate_up_proj[4], torch.cat([gate, up]))
