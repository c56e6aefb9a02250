"""Dry-run plans from the public config.json files of real checkpoints (tests/data/configs), no weights: every tensor
named with shape and bytes, per-rank shard sizes at an example layout; parameter counts against hand formulas and the
published sizes (Qwen3-30B-A3B 30.5B, Qwen3-235B-A22B 235B, Mixtral-8x7B 46.7B, DeepSeek-V3 671B without its MTP
layer)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vespo_megatron.cli import main as cli

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"

# name: (example layout flags, sizes: L layers, H hidden, nh heads, ng kv groups, d head, E experts, Fe expert FFN,
#        V vocabulary, q/k norm, published billions of parameters)
CASES = {
    "qwen3-30b-a3b": (["--tp", "2", "--ep", "8"], dict(L=48, H=2048, nh=32, ng=4, d=128, E=128, Fe=768, V=151936,
                                                       qk=True, billions=30.5)),
    "qwen3-235b-a22b": (["--tp", "4", "--pp", "2", "--ep", "16", "--etp", "1"],
                        dict(L=94, H=4096, nh=64, ng=4, d=128, E=128, Fe=1536, V=151936, qk=True, billions=235.1)),
    "mixtral-8x7b": (["--tp", "2", "--ep", "8", "--etp", "1"],
                     dict(L=32, H=4096, nh=32, ng=8, d=128, E=8, Fe=14336, V=32000, qk=False, billions=46.7)),
}


def flag(flags: list[str], name: str, default: int | None = 1) -> int | None:
    return int(flags[flags.index(name) + 1]) if name in flags else default


@pytest.mark.parametrize("name", sorted(CASES))
def test_dry_run_plan_of_a_real_config(name, tmp_path, capsys):
    flags, m = CASES[name]
    plan = dry_run_plan(name, tmp_path, capsys, *flags)
    L, H, nh, ng, d, E, Fe, V = (m[k] for k in ("L", "H", "nh", "ng", "d", "E", "Fe", "V"))
    tp, pp, ep = flag(flags, "--tp"), flag(flags, "--pp"), flag(flags, "--ep")
    etp = flag(flags, "--etp", None) or tp
    Vp = -(-V // (128 * tp)) * 128 * tp
    # parameters by hand: per layer 2 norms, q/k/v/o, q/k norms, router, E experts of gate/up/down; embeddings, head
    norms = 2 * H + (2 * d if m["qk"] else 0)
    attention = H * nh * d + 2 * H * ng * d + nh * d * H
    experts = E * 3 * Fe * H
    hf_params = L * (norms + attention + E * H + experts) + 2 * V * H + H
    assert abs(hf_params / 1e9 - m["billions"]) < 0.1
    tensors = plan["tensors"]
    hf_names = [n for t in tensors for n in t["hf"]]
    # per layer: 2 norms, q/k/v/o, router (+ q/k norms), 3 per expert; embeddings, final norm, lm_head
    assert len(hf_names) == len(set(hf_names)) == L * (7 + (2 if m["qk"] else 0) + 3 * E) + 3
    if name == "qwen3-30b-a3b":
        assert len(hf_names) == 18867  # the published tensor count of Qwen3-30B-A3B
    assert all(t["dtype"] == "bfloat16" for t in tensors)
    assert sum(t["nbytes"] for t in tensors) == 2 * (hf_params + 2 * (Vp - V) * H) == plan["total_bytes"]
    stacked = {t["key"] for t in tensors if t["key"].startswith("decoder.layers.")}
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight" in stacked  # homogeneous: stacked [L, E, ...]
    fc1 = [t for t in tensors if t["key"] == "decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    assert len(fc1) == L * E and fc1[-1]["index"] == [L - 1, E - 1] and fc1[0]["shape"] == [2 * Fe, H]
    # per-rank shards: experts split over ep·etp ranks, the rest over tp (norms and routers replicated)
    ranks = plan["ranks"]
    assert len(ranks) == pp * (tp + ep * etp)
    expert_dirs = [r for r in ranks if "/ep" in r]
    assert sum(ranks[r] for r in expert_dirs) == 2 * L * experts
    assert len({ranks[r] for r in expert_dirs}) == 1
    replicated = L * (norms + E * H) + H
    dense_split = L * attention + 2 * Vp * H
    assert sum(ranks[r] for r in ranks if "/tp" in r) == 2 * (tp * replicated + dense_split)
    assert plan["peak_bytes"] <= 2 * max(t["nbytes"] for t in tensors)


def dry_run_plan(name: str, tmp_path: Path, capsys, *flags: str) -> dict:
    src = tmp_path / name
    src.mkdir(exist_ok=True)
    (src / "config.json").write_bytes((CONFIGS / name / "config.json").read_bytes())  # config only: no weights
    out = tmp_path / "plan.json"
    assert cli(["convert", "hf-to-mcore", str(src), str(tmp_path / "mc"), "--dry-run", "--no-progress",
                "--plan-json", str(out), *flags]) == 0
    assert "planned from" in capsys.readouterr().out and not (tmp_path / "mc").exists()
    return json.loads(out.read_text())


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_dry_run_plan_of_deepseek_v3(impl, tmp_path, capsys):
    """DeepSeek-V3 (MLA, 3 dense + 58 MoE layers of 256 experts and a shared one, FP8 config, one MTP layer) at tp 8,
    ep 64, etp 1: every tensor by hand, 671B parameters, the MTP layer noted as skipped, per-rank shards (the MLA down
    projections split over tp by the local spec, replicated by the TE spec)."""
    tp, ep = 8, 64
    plan = dry_run_plan("deepseek-v3", tmp_path, capsys, "--tp", str(tp), "--ep", str(ep), "--etp", "1",
                        "--transformer-impl", impl)
    L, dense, H, nh, V, E, Fe, F = 61, 3, 7168, 128, 129280, 256, 2048, 18432
    qr, kvr, dn, dr, dv = 1536, 512, 128, 64, 128
    Vp = -(-V // (128 * tp)) * 128 * tp
    down = qr * H + (kvr + dr) * H  # q_a_proj, kv_a_proj_with_mqa
    up = nh * (dn + dr) * qr + nh * (dn + dv) * kvr + H * nh * dv  # q_b_proj, kv_b_proj, o_proj
    norms = 2 * H + qr + kvr  # input, post-attention, q_a and kv_a latent norms
    moe = E * H + E + E * 3 * Fe * H + 3 * Fe * H  # router, expert bias, routed experts, shared expert
    hf_params = L * (norms + down + up) + dense * 3 * F * H + (L - dense) * moe + 2 * V * H + H
    assert abs(hf_params / 1e9 - 671.0) < 0.1  # the published 671B of the main model (MTP: 14B more)
    tensors = plan["tensors"]
    hf_names = [n for t in tensors for n in t["hf"]]
    # per layer: 2 norms, 7 attention tensors; dense: 3; MoE: router, bias, 3 per expert, 3 shared; embeddings, norm, head
    assert len(hf_names) == len(set(hf_names)) == L * 9 + dense * 3 + (L - dense) * (2 + 3 * E + 3) + 3 == 45395
    assert not any(n.startswith("model.layers.61.") for n in hf_names)
    assert any("1 multi-token-prediction (MTP) layer(s) model.layers.61" in note for note in plan["notes"])
    bias = [t for t in tensors if t["key"].endswith("mlp.router.expert_bias")]
    assert len(bias) == L - dense and {t["dtype"] for t in bias} == {"float32"}
    assert {t["dtype"] for t in tensors if t not in bias} == {"bfloat16"}
    assert plan["total_bytes"] == sum(t["nbytes"] for t in tensors) == 2 * (hf_params + 2 * (Vp - V) * H) + 2 * E * (L - dense)
    norm_key = "self_attention.q_layernorm.weight" if impl == "local" else "self_attention.linear_q_up_proj.layer_norm_weight"
    assert [t["shape"] for t in tensors if t["key"] == f"decoder.layers.5.{norm_key}"] == [[qr]]
    assert [t["shape"] for t in tensors if t["key"] == "decoder.layers.5.self_attention.linear_kv_down_proj.weight"] == \
        [[kvr + dr, H]]
    fc1 = [t for t in tensors if t["key"] == "decoder.layers.60.mlp.experts.experts.linear_fc1.weight"]
    assert len(fc1) == E and fc1[-1]["index"] == [E - 1] and fc1[0]["shape"] == [2 * Fe, H]
    ranks = plan["ranks"]
    assert len(ranks) == tp + ep
    expert_dirs = [r for r in ranks if "/ep" in r]
    assert sum(ranks[r] for r in expert_dirs) == 2 * (L - dense) * E * 3 * Fe * H
    assert len({ranks[r] for r in expert_dirs}) == 1
    replicated = L * norms + (L - dense) * E * H + H + (down * L if impl == "transformer_engine" else 0)
    split = L * up + (0 if impl == "transformer_engine" else L * down) + dense * 3 * F * H + (L - dense) * 3 * Fe * H \
        + 2 * Vp * H
    assert sum(ranks[r] for r in ranks if "/tp" in r) == 2 * (tp * replicated + split) + 4 * tp * E * (L - dense)
    assert plan["peak_bytes"] <= 2 * max(t["nbytes"] for t in tensors)


def test_plan_json_needs_dry_run(tmp_path, capsys):
    assert cli(["convert", "hf-to-mcore", str(CONFIGS / "mixtral-8x7b"), str(tmp_path / "mc"),
                "--plan-json", str(tmp_path / "p.json")]) == 2
    assert "--plan-json: only with --dry-run" in capsys.readouterr().err
