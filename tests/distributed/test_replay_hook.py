"""The replay slot inside megatron-core's own top-k routing function (one process, no model build).

Toy routers call ``moe_utils.topk_routing_with_score_function`` with ``router_replay=self.router_replay`` exactly as
``TopKRouter.routing`` does; hand-computed gate weights, gradients, fallbacks, health counts, micro-batch cursors,
activation recomputation and every misuse error are checked here. The full model runs are in test_replay.py.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

pytest.importorskip("megatron.core")

from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402

from vespo_megatron.megatron import compat  # noqa: E402
from vespo_megatron.routing.health import differ_rows  # noqa: E402
from vespo_megatron.routing.replay import RoutingReplay, find_routers  # noqa: E402
from vespo_megatron.routing.shard import LocalTrace  # noqa: E402

E, K = 4, 2
# the upstream code the slot plugs into; a change means: re-check replay.py against the new hook
HOOK_TARGETS = (
    "megatron.core.transformer.moe.moe_utils:topk_routing_with_score_function",
    "megatron.core.transformer.moe.router:TopKRouter.routing",
    "megatron.core.transformer.moe.router_replay:RouterReplay.get_replay_topk",
)
HOOK_VERSIONS, HOOK_FINGERPRINT = ">=0.16,<0.17", "7efcbc8157aff118"


class ToyRouter(torch.nn.Module):
    """Routes its input logits [T, E] like TopKRouter.routing; keeps every routing map it produced."""

    def __init__(self, layer_number: int, score: str = "softmax", bias: torch.Tensor | None = None, **config) -> None:
        super().__init__()
        self.layer_number, self.topk, self.router_replay = layer_number, K, None
        self.score, self.bias = score, bias
        self.config = SimpleNamespace(moe_router_fusion=False, num_layers=4, moe_layer_freq=[0, 1, 1, 0],
                                      num_moe_experts=E, moe_router_topk=K, **config)
        self.maps: list[torch.Tensor] = []

    def routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs, routing_map = topk_routing_with_score_function(
            logits, K, score_function=self.score, expert_bias=self.bias, router_replay=self.router_replay)
        self.maps.append(routing_map)
        return probs, routing_map

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.routing(logits)  # (probs, routing_map) as TopKRouter.forward


class ToyModel(torch.nn.Module):
    """Two MoE layers (Megatron layers 2 and 3 = HF layers 1 and 2 = trace columns 0 and 1), one call per forward;
    ``recompute`` checkpoints each layer as Megatron's full recomputation does (re-run inside backward)."""

    def __init__(self, recompute: bool = False, **router_kwargs) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([ToyRouter(2, **router_kwargs), ToyRouter(3, **router_kwargs)])
        self.recompute = recompute

    def forward(self, logits: torch.Tensor) -> list[torch.Tensor]:
        if self.recompute:
            return [checkpoint(layer, logits, use_reentrant=True)[0] for layer in self.layers]
        return [layer(logits)[0] for layer in self.layers]


def ids_of(routing_map: torch.Tensor) -> list[list[int]]:
    return [sorted(row.nonzero()[:, 0].tolist()) for row in routing_map]


# live top-2 sets: {2, 3}, {0, 1}, {2, 3}
LOGITS = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 1.5, 3.0, 4.0]]))


def test_upstream_hook_unchanged():
    assert compat.megatron_version() in SpecifierSet(HOOK_VERSIONS)
    assert compat.source_fingerprint(HOOK_TARGETS) == HOOK_FINGERPRINT


def test_softmax_replay_gathers_full_scores_and_gradient_reaches_replayed_experts():
    model = ToyModel()
    replay = RoutingReplay(model, "r3")
    logits = LOGITS.clone().requires_grad_(True)
    target = np.array([[[0, 1], [0, 1]], [[3, 2], [0, 1]], [[1, 0], [2, 3]]], np.uint8)  # [T, columns, k]
    with replay.phase("update", [target]):
        probs = model(logits)[0]
    # softmax over the gathered logits: row 0 experts 0, 1 = log 1, log 2 -> 1/3, 2/3; row 1 experts 3, 2 = log 1,
    # log 2 -> 1/3, 2/3; row 2 experts 1, 0 = log 1.5, log 1 -> 0.6, 0.4
    expected = torch.tensor([[1 / 3, 2 / 3, 0, 0], [0, 0, 2 / 3, 1 / 3], [0.4, 0.6, 0, 0]])
    torch.testing.assert_close(probs, expected)
    probs[0, 0].backward()
    # d softmax_0 / d logit_0 = p0 (1 − p0) = 2/9 for expert 0, outside token 0's live top-2 {2, 3}
    torch.testing.assert_close(logits.grad[0], torch.tensor([2 / 9, -2 / 9, 0.0, 0.0]))


def test_sigmoid_with_expert_bias_uses_unbiased_scores_at_the_replayed_ids():
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    model = ToyModel(score="sigmoid", bias=bias)
    replay = RoutingReplay(model, "r3")
    logits = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0]])  # sigmoid: 1/2, 3/4, 1/2, 1/2; live picks 3 and 1
    with replay.phase("update", [np.array([[[0, 1], [0, 2]]])]):
        probs = model(logits)
    torch.testing.assert_close(probs[0], torch.tensor([[0.4, 0.6, 0.0, 0.0]]))  # (1/2, 3/4) / (5/4)
    torch.testing.assert_close(probs[1], torch.tensor([[0.5, 0.0, 0.5, 0.0]]))


def test_missing_rows_fall_back_to_the_live_router_and_health_counts_by_hand():
    model = ToyModel()
    replay = RoutingReplay(model, "r3")
    # column 0: row 0 = live set {2,3}; row 1 differs from live {0,1}; row 2 missing (code E) -> live {2,3}
    ids = np.array([[[3, 2], [0, 1]], [[0, 2], [0, 1]], [[E, E], [0, 1]]], np.uint8)
    local = LocalTrace(ids, np.array([0, 1, 2]), (0, 1), E)
    with replay.phase("old_logprob", [local]):
        model(LOGITS)
    assert ids_of(model.layers[0].maps[-1]) == [[2, 3], [0, 2], [2, 3]]
    health = replay.health.pop()
    assert health["routing_replay/rows_replayed"] == 2 + 3
    assert health["routing_replay/rows_fallback"] == 1
    assert health["routing_replay/differ_frac/layer_1"] == 0.5  # row 1 of 2 replayed rows
    assert health["routing_replay/differ_frac/layer_2"] == 2 / 3  # rows 0 and 2 replay {0,1} against live {2,3}
    assert replay.health.pop()["routing_replay/rows_replayed"] == 0  # popped counters start again


def test_slots_without_a_trace_row_route_live_and_are_not_counted():
    model = ToyModel()
    replay = RoutingReplay(model, "r3")
    ids = np.array([[[0, 1], [0, 1]], [[0, 1], [0, 1]], [[0, 1], [0, 1]]], np.uint8)  # rows 1, 2 hold the filler
    with replay.phase("old_logprob", [LocalTrace(ids, np.array([5, -1, -1]), (0, 1), E)]):
        model(LOGITS)
    assert ids_of(model.layers[0].maps[-1]) == [[0, 1], [0, 1], [2, 3]]  # live routing of rows 1, 2
    assert replay.health.pop()["routing_replay/rows_replayed"] == 2


def test_r2_replays_each_micro_batch_recording_in_order():
    model = ToyModel()
    replay = RoutingReplay(model, "r2")
    batches = [LOGITS, LOGITS.flip(1), LOGITS.roll(1, dims=1)]
    with replay.phase("old_logprob"):
        for logits in batches:
            model(logits)
    recorded = [ids_of(m) for m in model.layers[1].maps]
    with replay.phase("update"):
        for logits in batches:
            model(torch.zeros_like(logits))  # any live routing: the recording wins
        with pytest.raises(RuntimeError, match="micro-batch 3 has no recording"):
            model(LOGITS)
    assert [ids_of(m) for m in model.layers[1].maps[3:6]] == recorded
    with replay.phase("update", first_micro=1):  # a mini-batch update over recorded micro-batches 1 and 2
        for logits in batches[1:]:
            model(torch.zeros_like(logits))
    assert [ids_of(m) for m in model.layers[1].maps[6:8]] == recorded[1:]


def test_recomputation_inside_backward_replays_each_micro_batch_target():
    model = ToyModel(recompute=True)
    replay = RoutingReplay(model, "r3")
    targets = [np.array([[[0, 1], [0, 1]]] * 3), np.array([[[1, 2], [2, 3]]] * 3)]
    logits = LOGITS.clone().requires_grad_(True)
    with replay.phase("update", targets):
        losses = [sum(p[:, 1:].sum() for p in model(logits)) for _ in targets]  # two micro-batches forward
        forward_maps = [ids_of(m) for m in model.layers[1].maps]
        for loss in losses:  # then their backwards, in order (as 1F1B runs them)
            loss.backward()
    recomputed = [ids_of(m) for m in model.layers[1].maps[len(forward_maps):]]
    assert forward_maps == [[[0, 1]] * 3, [[2, 3]] * 3]
    assert recomputed == forward_maps
    with replay.phase("old_logprob", targets), torch.no_grad():  # forward-only: nothing will be recomputed
        model(logits)
        assert not model.layers[1].router_replay.recompute


def test_model_and_misuse_errors():
    assert ToyModel().layers[0].router_replay is None
    model = ToyModel()
    RoutingReplay(model, "off")
    assert model.layers[0].router_replay is None  # off installs nothing
    replay = RoutingReplay(model, "r3")
    with pytest.raises(ValueError, match="r3 needs the rollout routing"):
        with replay.phase("update"):
            pass
    with pytest.raises(ValueError, match="phase 'train'"):
        with replay.phase("train", []):
            pass
    with replay.phase("update", [np.zeros((2, 2, K), np.uint8)]):
        with pytest.raises(ValueError, match="router sees 3 tokens"):
            model(LOGITS)
        with pytest.raises(RuntimeError, match="routing given for 1"):
            model(LOGITS)
    with replay.phase("update", [LocalTrace(np.zeros((3, 1, K), np.uint8), np.arange(3), (1,), E)]):
        with pytest.raises(ValueError, match=r"lacks MoE layers \[1\]"):
            model(LOGITS)
    with pytest.raises(RuntimeError, match="inside phase"):
        with replay.phase("update", []), replay.phase("update", []):
            pass
    replay.remove()
    assert model.layers[0].router_replay is None
    with pytest.raises(ValueError, match="mode 'r4'"):
        RoutingReplay(model, "r4")


def test_router_discovery_rules():
    model = ToyModel()
    model.mtp = torch.nn.ModuleList([ToyRouter(1)])  # MTP layer numbers restart at 1: not a trace layer
    assert [r.layer_number for r in find_routers(model)] == [2, 3]
    fused = ToyModel()
    fused.layers[0].config.moe_router_fusion = True
    with pytest.raises(ValueError, match="moe_router_fusion"):
        find_routers(fused)
    old = ToyModel()
    del old.layers[1].router_replay
    with pytest.raises(RuntimeError, match="no routing-replay hook"):
        find_routers(old)
    dense = ToyModel()
    dense.layers[1].layer_number = 4  # HF layer 3 is dense in the config
    with pytest.raises(ValueError, match="Megatron layer 4 is not an MoE layer"):
        RoutingReplay(dense, "r3")


def test_differ_rows_by_hand():
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.1, 0.4, 0.3, 0.2]])
    live_values, live_ids = torch.topk(scores, K, dim=1)  # {1, 2}
    ids = torch.tensor([[2, 1], [1, 3]])
    for grouped in (False, True):
        assert differ_rows(scores, ids, scores.gather(1, ids), live_ids, live_values, grouped).tolist() == [False, True]
    # group-limited top-k that kept only group {2, 3}: the live set is {2, 3}; {1, 2} scores higher but differs
    live_ids, live_values = torch.tensor([[2, 3], [3, 2]]), torch.tensor([[0.3, 0.2], [0.3, 0.2]])
    ids = torch.tensor([[1, 2], [2, 3]])
    assert differ_rows(scores, ids, scores.gather(1, ids), live_ids, live_values, True).tolist() == [True, False]
