"""Routing replay in Megatron-Core routers, checked against a 1-rank capture.

Model A routes a batch live on 1 rank; its experts (per sample, token, MoE layer) and log-probs are captured by
forward hooks on the routers (independent of the replay code). Then, under 1 rank, TP2+SP, EP2, PP2 and TP2·EP2,
with 2 and 4 micro-batches:
  (a) A replaying its own trace (SGLang format, decoded) gives log-probs bit-identical to A's live run there;
  (b) B = A with perturbed router weights (live routing differs on a measured fraction of (token, layer) pairs)
      replaying A's trace routes every token of every MoE layer to exactly A's experts.
Also (1 rank): the router-weight gradient under replay matches finite differences, including an expert that is
never in the live top-k; R2 replays in every update (and in every recomputed router) exactly the experts recorded
in the old-log-prob pass, for every micro-batch; a forward-only pass leaves nothing queued for the next step.
"""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core import parallel_state  # noqa: E402

from tests.distributed import parallel_cases  # noqa: E402
from tests.distributed.parallel_cases import make_samples  # noqa: E402
from vespo_megatron.hf_config import tiny_hf_config  # noqa: E402
from vespo_megatron.megatron.batch import micro_batch  # noqa: E402
from vespo_megatron.megatron.loss import LossSettings, token_logprobs  # noqa: E402
from vespo_megatron.megatron.model import build_model  # noqa: E402
from vespo_megatron.megatron.parallel import init_parallel, spawn  # noqa: E402
from vespo_megatron.megatron.step import forward_backward, old_log_probs, wrap_ddp, zero_grads  # noqa: E402
from vespo_megatron.megatron.weights import load_global  # noqa: E402
from vespo_megatron.packing.reference import pack as pack_batch  # noqa: E402
from vespo_megatron.routing.capture import RouterCapture  # noqa: E402
from vespo_megatron.routing.replay import RoutingReplay, find_routers  # noqa: E402
from vespo_megatron.routing.shard import batch_shard  # noqa: E402
from vespo_megatron.routing.trace import SampleRouting, TracePart, TraceSpec, decode_batch, pack  # noqa: E402

FAMILIES = {"qwen3_moe": {"mlp_only_layers": [1]}, "mixtral": {}, "deepseek_v3": {}}  # dense layer 1 / 0 / none
PARALLEL_FAMILIES = ["qwen3_moe", "deepseek_v3"]  # softmax top-k and sigmoid + expert bias; mixtral on 1 rank
LAYOUTS = {"tp2_sp": dict(tp=2), "ep2": dict(ep=2), "pp2": dict(pp=2), "tp2_ep2": dict(tp=2, ep=2, etp=1)}
N_SAMPLES, N_MICROS, DTYPE = 8, (2, 4), torch.float64


def hf_config(family: str):
    return tiny_hf_config(family, **FAMILIES[family])


def probe_routers(model: torch.nn.Module) -> RouterCapture:
    """Every router's expert sets (sorted ids [T, k]) per call, by layer_number."""
    routers = find_routers(model)
    return RouterCapture(routers, [router.layer_number for router in routers])


def initial_weights(hf, seed: int = 7) -> tuple[dict, dict]:
    """Global weights of A, and of B = A with router weights perturbed (1-rank world)."""
    weights_a = parallel_cases.initial_weights(hf, DTYPE, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    weights_b = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen, dtype=v.dtype) if k.endswith(
        "router.weight") else v for k, v in weights_a.items()}
    return weights_a, weights_b


def split(samples: list, n_micro: int, sp_rank: int) -> list:
    """This rank's micro-batches (``parallel_cases.micro_batches``: round-robin, every dp-th to DP rank d)."""
    sp = parallel_state.get_tensor_model_parallel_world_size()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    return parallel_cases.micro_batches(samples, n_micro, sp, sp_rank, dp, dp_rank)


def slot_experts(experts: list[np.ndarray], piece, sp_rank: int, column: int) -> tuple[np.ndarray, np.ndarray]:
    """A's experts [T, k] at this rank's router rows for trace column ``column``, and the [T] real-token mask."""
    b = piece.extra["packed"]
    t = b.tokens.shape[1] // b.sp
    seq, pos = b.seq_index[0, sp_rank * t:(sp_rank + 1) * t], b.position_ids[0, sp_rank * t:(sp_rank + 1) * t]
    real = seq >= 0
    out = np.zeros((t, experts[0].shape[2]), np.int64)
    out[real] = [experts[piece.extra["sample_ids"][s]][p, column] for s, p in zip(seq[real], pos[real])]
    return out, real


def compare(calls: dict, experts: list, pieces: list, replay: RoutingReplay, sp_rank: int,
            skip_last: bool) -> tuple[int, int]:
    """(mismatching, compared) (token, layer) pairs between router calls and A's experts."""
    bad = total = 0
    layer_numbers = sorted(calls)
    for i, piece in enumerate(pieces):
        for layer_number in layer_numbers:
            column = replay.spec.moe_layers.index(layer_number - 1)
            want, real = slot_experts(experts, piece, sp_rank, column)
            if skip_last:  # SGLang traces have no row for a sample's last token: it is routed live
                b = piece.extra["packed"]
                t = b.tokens.shape[1] // b.sp
                seq = b.seq_index[0, sp_rank * t:(sp_rank + 1) * t]
                pos = b.position_ids[0, sp_rank * t:(sp_rank + 1) * t]
                real &= pos != b.seq_lens[np.maximum(seq, 0)] - 1
            got = calls[layer_number][i].numpy()
            bad += int((got[real] != want[real]).any(axis=1).sum())
            total += int(real.sum())
    return bad, total


def sglang_traces(experts: list[np.ndarray], spec: TraceSpec) -> list[SampleRouting]:
    """A's experts as SGLang returns them: rows n−1, every HF layer (dense ones zero), flat int32 base64."""
    out = []
    for i, ex in enumerate(experts):
        full = np.zeros((len(ex) - 1, spec.num_hf_layers, spec.topk), np.int32)
        full[:, list(spec.moe_layers)] = ex[:-1]
        raw = base64.b64encode(full.tobytes())
        out.append(SampleRouting((TracePart(raw.decode() if i % 2 else raw),), len(ex)))
    return out


def check_layout(layout: dict, family: str, weights: tuple, samples: list, experts: list, n_micros) -> dict:
    """(a) and (b) under ``layout`` (call inside an initialised world)."""
    init_parallel(**layout)
    hf = hf_config(family)
    model = build_model(hf, dtype=DTYPE)
    replay, probe = RoutingReplay(model, "r3"), probe_routers(model)
    sp_rank = parallel_state.get_tensor_model_parallel_rank()
    last = parallel_state.is_pipeline_last_stage()
    sglang = decode_batch(sglang_traces(experts, replay.spec), replay.spec)
    full = pack(experts, replay.spec)  # rows for every token, the last one included
    result = {"bitwise": True, "a_live": [0, 0], "a_replay": [0, 0], "b_replay": [0, 0], "b_live": [0, 0]}

    def add(key, counts):
        result[key] = [result[key][0] + counts[0], result[key][1] + counts[1]]

    for n_micro in n_micros:
        pieces = split(samples, n_micro, sp_rank)
        mbs = pieces
        shards = {name: [batch_shard(trace, p.extra["packed"], 0, sp_rank, replay.layer_columns) for p in pieces]
                  for name, trace in (("sglang", sglang), ("full", full))}
        load_global(model, weights[0])
        live = old_log_probs(model, mbs)
        add("a_live", compare(probe.pop()[0], experts, pieces, replay, sp_rank, False))
        with replay.phase("old_logprob", shards["sglang"]):
            replayed = old_log_probs(model, mbs)
        add("a_replay", compare(probe.pop()[0], experts, pieces, replay, sp_rank, True))
        if last:
            result["bitwise"] &= all(torch.equal(x, y) for x, y in zip(live, replayed))
        load_global(model, weights[1])
        old_log_probs(model, mbs)
        add("b_live", compare(probe.pop()[0], experts, pieces, replay, sp_rank, False))
        with replay.phase("old_logprob", shards["full"]):
            old_log_probs(model, mbs)
        add("b_replay", compare(probe.pop()[0], experts, pieces, replay, sp_rank, False))
    result["health"] = replay.health.pop()
    return result


def capture(model: torch.nn.Module, samples: list) -> list[np.ndarray]:
    """A's live experts per sample [n_i, num_moe_layers, k] (sorted ids), from one 1-rank micro-batch."""
    probe = probe_routers(model)
    batch = pack_batch(samples, cp=1, sp=1)
    old_log_probs(model, [micro_batch(batch)])
    calls = probe.pop()[0]
    probe.remove()
    per_layer = np.stack([calls[n][0].numpy() for n in sorted(calls)], axis=1)  # [t, L, k]
    return [per_layer[(batch.seq_index[0] == i)] for i in range(len(samples))]


# ------------------------------------------------------------------------------------------------ rank functions
def reference_rank(rank: int, family: str) -> dict:
    """1 rank: capture A, then (a)/(b) on 1 rank, the gradient check (and for qwen3_moe R2 + recompute)."""
    init_parallel()
    hf = hf_config(family)
    weights = initial_weights(hf)
    samples = make_samples(N_SAMPLES, seed=3)
    model = build_model(hf, dtype=DTYPE)
    load_global(model, weights[0])
    experts = capture(model, samples)
    out = {"weights": weights, "samples": samples, "experts": experts}
    out["one_rank"] = check_layout({}, family, weights, samples, experts, (1,) + N_MICROS)
    out["gradient"] = gradient_check(hf, weights[1], samples)
    out["r2"] = r2_check(hf, weights, samples)
    return out


def parallel_rank(rank: int, family: str, weights: tuple, samples: list, experts: list) -> dict:
    return {name: check_layout(layout, family, weights, samples, experts, N_MICROS) for name, layout in LAYOUTS.items()}


def response_logp_sum(model: torch.nn.Module, mb) -> torch.Tensor:
    output = model(mb.tokens[None], mb.position_ids[None], None, packed_seq_params=mb.packed_seq_params())
    logp, _ = token_logprobs(output, mb, model.hf_config.vocab_size, inplace=False)
    return (logp * mb.loss_mask).sum()


def gradient_check(hf, weights_b: dict, samples: list) -> dict:
    """∂/∂W_router of Σ response log-probs under replay vs finite differences; the replayed trace gives every
    token as second expert the one B's live router picks least in that layer (mostly outside the live top-k)."""
    model = build_model(hf, dtype=DTYPE)
    load_global(model, weights_b)
    replay = RoutingReplay(model, "r3")
    batch = pack_batch(samples, cp=1, sp=1, sample_ids=list(range(len(samples))))
    mb = micro_batch(batch)
    live = capture(model, samples)
    column = 0
    counts = np.bincount(np.concatenate(live)[:, column].reshape(-1), minlength=replay.spec.num_experts)
    rare = int(np.argmin(counts))
    trace = [ex.copy() for ex in live]
    for ex in trace:
        ex[:, column, 1] = np.where(ex[:, column, 0] == rare, (rare + 1) % replay.spec.num_experts, rare)
    replayed = np.concatenate(trace)[:, column]
    outside = float(((replayed == rare).any(axis=1) & ~(np.concatenate(live)[:, column] == rare).any(axis=1)).sum())
    local = [batch_shard(pack(trace, replay.spec), batch, 0, 0, replay.layer_columns)]
    router = next(m for n, m in model.named_modules() if n.endswith("mlp.router")
                  and replay.spec.moe_layers.index(m.layer_number - 1) == column)
    weight = router.weight
    with replay.phase("update", local):
        response_logp_sum(model, mb).backward()
    grad = weight.grad.detach().clone()
    # the router's softmax/sigmoid run in fp32 (megatron), so the loss carries ~1e-7 noise: a 5-point stencil
    # with a wide step keeps both that noise and the truncation error near 1e-5
    step, checks = 1e-2, []
    for e, h in ((rare, 0), (rare, 5), (int(np.argmax(counts)), 3)):
        values = []
        for shift in (2, 1, -1, -2):
            with torch.no_grad():
                weight[e, h] += shift * step
            with replay.phase("update", local), torch.no_grad():
                values.append(float(response_logp_sum(model, mb)))
            with torch.no_grad():
                weight[e, h] -= shift * step
        numeric = (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * step)
        checks.append((float(grad[e, h]), numeric))
    return {"outside_live": outside / (replayed == rare).any(axis=1).sum(), "checks": checks}


def r2_check(hf, weights: tuple, samples: list) -> dict:
    """R2 with activation recomputation and 4 micro-batches; then an R3 forward-only pass followed by an update."""
    model = build_model(hf, dtype=DTYPE, recompute=True)
    load_global(model, weights[0])
    ddp = wrap_ddp(model)
    probe = probe_routers(model)
    pieces = split(samples, 4, 0)
    mbs = pieces
    replay = RoutingReplay(ddp, "r2")
    with replay.phase("old_logprob"):
        olds = old_log_probs(ddp, mbs)
    recorded = probe.pop()[0]
    mbs = [mb.with_old_log_prob(o) for mb, o in zip(mbs, olds)]
    load_global(model, weights[1])
    settings = LossSettings(name="vespo")
    out = {}
    for update in range(2):
        zero_grads(ddp)
        with replay.phase("update"):
            forward_backward(ddp, mbs, settings)
        forward, recomputed = probe.pop()
        out[f"update{update}"] = {
            "forward": all(torch.equal(forward[n][i], recorded[n][i]) for n in recorded for i in range(4)),
            "recomputed": all(torch.equal(recomputed[n][i], recorded[n][i]) for n in recorded for i in range(4)),
            "calls": (sum(map(len, forward.values())), sum(map(len, recomputed.values()))),
        }
    out["health"] = replay.health.pop()
    replay.remove()
    # R3: a forward-only pass queues targets for recomputation; the next phase must not see them
    r3 = RoutingReplay(ddp, "r3")
    experts = capture(model, samples)
    shifted = [(ex + 1) % r3.spec.num_experts for ex in experts]  # another valid routing
    traces = {name: [batch_shard(pack(t, r3.spec), p.extra["packed"], 0, 0, r3.layer_columns) for p in pieces]
              for name, t in (("x", shifted), ("y", experts))}
    with r3.phase("old_logprob", traces["x"]):
        old_log_probs(ddp, mbs)
    probe.pop()
    zero_grads(ddp)
    with r3.phase("update", traces["y"]):
        forward_backward(ddp, mbs, settings)
    _, recomputed = probe.pop()
    out["recompute_after_forward_only"] = compare(recomputed, experts, pieces, r3, 0, False)
    return out


# ------------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module", params=list(FAMILIES))
def reference(request):
    return request.param, spawn(reference_rank, 1, request.param)[0]


def _assert_layout(name: str, result: dict) -> None:
    assert result["bitwise"], f"{name}: A replaying its own trace changed its log-probs"
    for key in ("a_live", "a_replay", "b_replay"):
        bad, total = result[key]
        assert total > 0 and bad == 0, f"{name}: {key}: {bad} of {total} (token, layer) pairs differ from A"


def test_one_rank_replay_reproduces_a(reference):
    family, ref = reference
    result = ref["one_rank"]
    _assert_layout(f"{family} 1 rank", result)
    bad, total = result["b_live"]
    assert bad / total > 0.1, f"B's live routing differs from A's on only {bad}/{total} pairs"
    assert result["health"]["routing_replay/differ_frac"] > 0.05


def test_router_gradient_matches_finite_differences(reference):
    family, ref = reference
    grad = ref["gradient"]
    assert grad["outside_live"] > 0.8, "the replayed test expert is mostly inside the live top-k"
    for analytic, numeric in grad["checks"]:
        assert analytic != 0.0
        assert abs(analytic - numeric) <= 1e-3 * max(1.0, abs(numeric)), (analytic, numeric)


def test_r2_replays_the_recording_in_every_update_and_recomputation(reference):
    family, ref = reference
    r2 = ref["r2"]
    for update in ("update0", "update1"):
        assert r2[update]["forward"] and r2[update]["recomputed"], r2[update]
        assert r2[update]["calls"][0] == r2[update]["calls"][1] > 0
    assert r2["health"]["routing_replay/differ_frac"] > 0.05  # B drifted from A: replay held the routing fixed
    bad, total = r2["recompute_after_forward_only"]
    assert total > 0 and bad == 0


@pytest.mark.parametrize("reference", PARALLEL_FAMILIES, indirect=True)
def test_parallel_layouts_replay_the_one_rank_trace(reference):
    family, ref = reference
    ranks = spawn(parallel_rank, 2, family, ref["weights"], ref["samples"], ref["experts"])
    for name in LAYOUTS:
        merged = dict(ranks[0][name])
        merged["bitwise"] = all(r[name]["bitwise"] for r in ranks)
        for key in ("a_live", "a_replay", "b_replay"):
            merged[key] = [sum(r[name][key][j] for r in ranks) for j in range(2)]
        _assert_layout(f"{family} {name}", merged)
