"""The converted checkpoint under real parallel layouts on gloo ranks: TP2·EP2 (2 ranks, expert TP 1) loads with
Megatron's own loader and gives the HF model's logits within 1e-5 for every family; under TP2·EP2 and PP2 each rank's
loaded parameters equal the per-rank shards the converter wrote for that layout; a checkpoint that Megatron itself
saves under TP2·EP2 (TP/EP-split chunks) converts back to the original HF tensors bitwise."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vespo_megatron.cli import main as cli
from vespo_megatron.convert.mcore_to_hf import McoreToHfOptions, convert_mcore_to_hf
from vespo_megatron.convert.parity import hf_logits
from vespo_megatron.megatron.parallel import spawn

from tests.e2e.test_convert_roundtrip import CASES, assert_bitwise, save_tiny, tensors

ATOL = 1e-5
VOCAB = 250


def _loaded_model(src: str, mcore: str):
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    from vespo_megatron.convert.parity import build_megatron

    model = build_megatron(AutoConfig.from_pretrained(src)).eval()
    result = model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), mcore), strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
    return model


def _matches_rank_shards(model, mcore: str) -> int:
    from megatron.core import parallel_state as ps

    from vespo_megatron.convert.rank_shards import load_rank_state_dict

    shards = load_rank_state_dict(mcore, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                  ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank())
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert shards.keys() == state.keys(), set(shards) ^ set(state)
    for name, value in state.items():
        assert shards[name].dtype == value.dtype and torch.equal(shards[name], value), name
    return len(state)


def rank_main(rank: int, cases: dict, tokens: torch.Tensor) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from vespo_megatron.convert.parity import megatron_logits
    from vespo_megatron.megatron.parallel import init_parallel

    out = {}
    for family, case in cases.items():
        init_parallel(tp=2, ep=2, etp=1)
        model = _loaded_model(case["hf"], case["tp2ep2"])
        local = megatron_logits(model, tokens)  # [b, s, Vp / tp]
        parts = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        out[family] = {"logits": torch.cat(parts, dim=-1)[..., :VOCAB], "tensors": _matches_rank_shards(model, case["tp2ep2"])}
        dist_checkpointing.save(model.sharded_state_dict(), case["saved"])
    init_parallel(pp=2)
    out["pp2_tensors"] = _matches_rank_shards(_loaded_model(cases["qwen3_moe"]["hf"], cases["qwen3_moe"]["pp2"]),
                                              cases["qwen3_moe"]["pp2"])
    return out


@pytest.mark.slow
def test_tp2_ep2_logits_and_per_rank_shards(tmp_path):
    cases: dict[str, dict[str, str]] = {}
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    expected = {}
    for family in CASES:
        src = save_tiny(family, tmp_path / family / "hf")
        case = {"hf": str(src), "tp2ep2": str(tmp_path / family / "tp2ep2"), "saved": str(tmp_path / family / "saved")}
        Path(case["saved"]).mkdir()
        assert cli(["convert", "hf-to-mcore", case["hf"], case["tp2ep2"], "--tp", "2", "--ep", "2", "--etp", "1",
                    "--per-rank", "--no-progress"]) == 0
        if family == "qwen3_moe":
            case["pp2"] = str(tmp_path / family / "pp2")
            assert cli(["convert", "hf-to-mcore", case["hf"], case["pp2"], "--pp", "2", "--per-rank", "--no-progress"]) == 0
        cases[family] = case
        expected[family] = hf_logits(Path(src), tokens)
    results = spawn(rank_main, 2, cases, tokens)
    for family in CASES:
        for rank in range(2):
            diff = (results[rank][family]["logits"] - expected[family]).abs().max().item()
            assert diff < ATOL, (family, rank, diff)
            assert results[rank][family]["tensors"] > 10
    assert all(r["pp2_tensors"] > 10 for r in results)
    for family, case in cases.items():
        back = tmp_path / family / "back"
        convert_mcore_to_hf(case["saved"], back, McoreToHfOptions(hf_config=Path(case["hf"]), progress=False))
        assert_bitwise(tensors(Path(case["hf"])), tensors(back))
