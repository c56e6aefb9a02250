"""Routing replay in Megatron-Core's MoE routers: off, R2 (record π_old's experts, replay them in every update) and
R3 (replay the rollout engine's experts in the old-log-prob pass and the updates).

Hook: megatron-core ≥ 0.16 routes the top-k of ``TopKRouter.routing`` through ``router.router_replay
.get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)`` (``moe_utils.
topk_routing_with_score_function``). We put our own :class:`_RouterSlot` in that attribute of each router found by
walking THIS model's modules (MTP layers excluded), so nothing goes through megatron's process-global instance list.

Replay keeps the expert SET and recomputes the gate weights from the live router: for target ids I [T, k],
probs = scores.gather(1, I) of the FULL scores (softmax: logits, then softmax over the k gathered; sigmoid + expert
bias: megatron re-gathers the unbiased sigmoid scores at I and normalises), so ∂loss/∂W_router flows through every
replayed expert, also one outside today's live top-k. A row whose target is −1 takes the live top-k: a missing
trace entry (counted as fallen back) and every slot without a trace row (pads, the last token of an SGLang sample;
not counted). Routing those live keeps the routing of a model replaying its own trace identical to its live routing
everywhere, so its log-probs are bit-identical (a filler routing of pads would change the experts' GEMM batches).

R2 records with :class:`~vespo_megatron.routing.capture.RouterCapture` (forward hooks on the same routers) during the
old-log-prob pass: the expert set of every micro-batch, by trace column, as compact ids on the router's device.

Micro-batches: a forward pre-hook on each model chunk advances that chunk's micro-batch cursor (any PP schedule runs
a chunk's forwards in micro-batch order). Activation recomputation re-runs routers inside backward: in a forward
that tracks gradients, a router call with grad disabled (a checkpointed region) queues its target, and a call inside
backward pops the oldest one (backward runs micro-batches in forward order); forward-only passes queue nothing.
Every :meth:`RoutingReplay.phase` clears these queues and targets on exit.

Router rows are the router input [s/tp, b=1, h] flattened (this rank's SP slice of its CP pack), i.e. exactly the
rows of a :class:`~vespo_megatron.routing.shard.LocalTrace`.
"""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from vespo_megatron.routing.args import REPLAY_MODES
from vespo_megatron.routing.capture import RouterCapture, in_backward
from vespo_megatron.routing.health import ReplayHealth, differ_rows
from vespo_megatron.routing.shard import LocalTrace
from vespo_megatron.routing.trace import TraceSpec

PHASES = ("old_logprob", "update")
Routing = LocalTrace | np.ndarray  # a LocalTrace, or [T, num_moe_layers, k] with every trace column


def find_routers(chunk: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE routers of the decoder of ``chunk`` (wrappers allowed), in module order; MTP layers excluded."""
    routers = []
    for name, module in chunk.named_modules():
        if not all(hasattr(module, attr) for attr in ("routing", "topk", "layer_number", "config")):
            continue
        if "mtp" in name.split("."):  # MTP layers restart layer_number at 1: they are not trace layers
            continue
        if not hasattr(module, "router_replay"):
            raise RuntimeError(f"{name}: this megatron-core has no routing-replay hook (needs >= 0.16)")
        if module.config.moe_router_fusion:
            raise ValueError(f"{name}: moe_router_fusion=True bypasses the routing-replay hook; disable it")
        if getattr(module, "routing_type", None) == "sinkhorn":
            raise ValueError(f"{name}: sinkhorn routing has no routing-replay hook")
        routers.append(module)
    return routers


def compact_dtype(num_experts: int) -> torch.dtype:
    """Narrowest torch dtype holding expert ids < num_experts (R2 recordings)."""
    return torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 32768 else torch.int32


class _RouterSlot:
    """Sits in ``router.router_replay`` of one MoE layer (trace column ``column``)."""

    def __init__(self, column: int, num_experts: int, health: ReplayHealth) -> None:
        self.column, self.num_experts, self.health = column, num_experts, health
        self.action: Optional[str] = None  # None (live) or "replay"
        self.target: Optional[torch.Tensor] = None  # [T, k] int64 (any value on live rows)
        self.live_rows: Optional[torch.Tensor] = None  # [T] bool rows routed live, or None when there is none
        self.recompute: deque = deque()  # targets of checkpointed calls, for their recomputation in backward
        self.grad_forward = False  # this micro-batch's model forward tracks gradients (recomputation possible)

    def set_target(self, target: torch.Tensor, live_rows: Optional[torch.Tensor]) -> None:
        self.target, self.live_rows = target, live_rows

    def clear(self) -> None:
        self.action = self.target = self.live_rows = None
        self.recompute.clear()

    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: Optional[int] = None,
        group_topk: Optional[int] = None,
        default_compute_topk: Optional[Callable] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Megatron's hook: (values, ids [T, k]) for ``scores`` [T, E]."""
        live = lambda: default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)  # noqa: E731
        if self.action is None:
            return live()
        backward = in_backward()
        if backward:
            if not self.recompute:
                raise RuntimeError(f"routing replay, trace column {self.column}: a recomputed router has no queued "
                                   "target (was the forward run outside RoutingReplay.phase?)")
            target, live_rows = self.recompute.popleft()
        else:
            if self.target is None:
                raise RuntimeError(f"routing replay, trace column {self.column}: no routing installed for this "
                                   "micro-batch")
            target, live_rows = self.target, self.live_rows
            if self.grad_forward and not torch.is_grad_enabled():
                self.recompute.append((target, live_rows))
        if target.shape != (scores.shape[0], topk):
            raise ValueError(f"routing replay, trace column {self.column}: the trace has {tuple(target.shape)} "
                             f"rows x ids, the router sees {scores.shape[0]} tokens x topk {topk}")
        ids = target.to(scores.device)
        if backward and live_rows is None:
            return scores.gather(1, ids), ids
        live_values, live_ids = live()
        if live_rows is not None:
            ids = torch.where(live_rows.to(scores.device)[:, None], live_ids, ids)
        values = scores.gather(1, ids)
        if not backward:  # rows routed live never differ from the live top-k
            differ = differ_rows(scores, ids, values, live_ids, live_values, bool(group_topk))
            self.health.add_differ(self.column, differ.sum())
        return values, ids


class RoutingReplay:
    """Routing replay for one model (a module or a list of virtual-pipeline chunks) on this rank.

    Usage per RL step (``routing`` holds one entry per micro-batch, in forward order)::

        replay = RoutingReplay(model, "r3")
        with replay.phase("old_logprob", routing):   # r2: records; r3: replays the rollout's experts
            old_log_probs(model, micro_batches)
        with replay.phase("update", routing):        # r2: replays the recording (routing unused); r3 replays
            forward_backward(model, micro_batches, settings)  # r2 over mini-batches: first_micro=offset
        metrics = replay.health.pop(group)
    """

    def __init__(self, model: torch.nn.Module | Sequence[torch.nn.Module], mode: str) -> None:
        if mode not in REPLAY_MODES:
            raise ValueError(f"routing replay mode {mode!r} is not one of {REPLAY_MODES}")
        self.mode = mode
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        routers = [find_routers(chunk) for chunk in self.chunks]
        first = next((r[0] for r in routers if r), None)
        if first is None:
            raise ValueError("routing replay: the model has no MoE router on this rank")
        self.spec = TraceSpec.from_transformer_config(first.config)
        self.health = ReplayHealth(self.spec.moe_layers)
        self._slots: list[list[_RouterSlot]] = []
        self._originals: list[tuple[torch.nn.Module, Any]] = []
        self._hooks = []
        self.layer_columns: list[int] = []  # trace column of every local router, all chunks, in order
        # r2: the old-log-prob pass records each router's experts ([T, k] compact ids per micro-batch, by column)
        self._capture: Optional[RouterCapture] = None
        self._recorded: dict[int, list[torch.Tensor]] = {}
        for routers_of_chunk in routers:
            slots = []
            for router in routers_of_chunk:
                column = self._column(router)
                slot = _RouterSlot(column, self.spec.num_experts, self.health)
                if mode != "off":
                    self._originals.append((router, router.router_replay))
                    router.router_replay = slot
                slots.append(slot)
                self.layer_columns.append(column)
            self._slots.append(slots)
        self._routing: Optional[Sequence[Routing]] = None
        self._phase: Optional[str] = None
        self._first = 0
        self._cursor = [0] * len(self.chunks)
        if mode != "off":
            self._hooks = [chunk.register_forward_pre_hook(self._hook(ci)) for ci, chunk in enumerate(self.chunks)]
        if mode == "r2":
            self._capture = RouterCapture([r for rs in routers for r in rs], self.layer_columns,
                                          dtype=compact_dtype(self.spec.num_experts), active=False)

    def _column(self, router: torch.nn.Module) -> int:
        hf_layer = router.layer_number - 1  # Megatron layer_number is global and 1-based, in HF layer order
        if hf_layer not in self.spec.moe_layers:
            raise ValueError(f"router of Megatron layer {router.layer_number} is not an MoE layer of the config "
                             f"(MoE HF layers {self.spec.moe_layers})")
        if router.topk != self.spec.topk or router.config.num_moe_experts != self.spec.num_experts:
            raise ValueError(f"router of layer {router.layer_number}: topk/experts differ from the model config")
        return self.spec.moe_layers.index(hf_layer)

    def remove(self) -> None:
        """Give every router its previous ``router_replay`` back and drop the hooks."""
        for router, original in self._originals:
            router.router_replay = original
        for hook in self._hooks:
            hook.remove()
        if self._capture is not None:
            self._capture.remove()
        self._originals, self._hooks, self._capture = [], [], None

    @contextlib.contextmanager
    def phase(
        self, name: str, routing: Optional[Sequence[Optional[Routing]]] = None, first_micro: int = 0
    ) -> Iterator["RoutingReplay"]:
        """One pass over micro-batches: ``old_logprob`` (forward only) or ``update`` (forward + backward).

        ``routing`` (r3): one entry per micro-batch of this pass. ``first_micro`` (r2 updates): index, among the
        micro-batches the old-log-prob pass recorded, of this pass's first one (an update over one mini-batch).
        """
        if name not in PHASES:
            raise ValueError(f"phase {name!r} is not one of {PHASES}")
        if self._phase is not None:
            raise RuntimeError(f"routing replay: phase {name!r} started inside phase {self._phase!r}")
        if self.mode == "r3" and routing is None:
            raise ValueError("r3 needs the rollout routing of every micro-batch")
        recording = self.mode == "r2" and name == "old_logprob"
        for slots in self._slots:
            for slot in slots:
                slot.clear()
                slot.action = None if self.mode == "off" or recording else "replay"
        if recording:
            self._capture.pop()
            self._capture.active = True
        self._phase, self._routing, self._first = name, routing, first_micro
        self._cursor = [0] * len(self.chunks)
        try:
            yield self
        finally:
            for slots in self._slots:
                for slot in slots:
                    slot.clear()
            if recording:
                self._capture.active = False
                self._recorded = self._capture.pop()[0]
            self._phase, self._routing = None, None

    def _hook(self, chunk_index: int) -> Callable:
        def pre_forward(module: torch.nn.Module, args: Any) -> None:
            if self._phase is None or in_backward():
                return  # outside a phase: live routing; inside backward: a recomputation, served by the queues
            micro = self._cursor[chunk_index]
            self._cursor[chunk_index] += 1
            for slot in self._slots[chunk_index]:
                slot.grad_forward = torch.is_grad_enabled()
            self._install(chunk_index, micro)

        return pre_forward

    def _install(self, chunk_index: int, micro: int) -> None:
        slots = self._slots[chunk_index]
        if not slots or slots[0].action != "replay":
            return
        if self.mode == "r2":
            micro += self._first
            for slot in slots:
                recorded = self._recorded.get(slot.column, [])
                if micro >= len(recorded):
                    raise RuntimeError(f"r2: update micro-batch {micro} has no recording (the old-log-prob pass "
                                       f"recorded {len(recorded)})")
                slot.set_target(recorded[micro].long(), None)
            rows = np.array([len(slot.target) for slot in slots])
            self.health.add_rows([slot.column for slot in slots], rows, np.zeros_like(rows))
            return
        if micro >= len(self._routing):
            raise RuntimeError(f"r3: forward of micro-batch {micro}, routing given for {len(self._routing)}")
        columns = [slot.column for slot in slots]
        ids, has_row = self._local_ids(self._routing[micro], columns, micro)
        row = np.ones(len(ids), bool) if has_row is None else has_row
        first = ids[:, :, 0]
        missing = first >= self.spec.num_experts
        if np.issubdtype(ids.dtype, np.signedinteger):
            missing |= first < 0
        fallback = np.zeros(len(columns), np.int64)
        if missing.any():  # [T, L_local] per-layer live rows: missing entries and slots without a trace row
            fallback = np.count_nonzero(row[:, None] & missing, axis=0)
            live = missing | ~row[:, None]
            rows = [torch.from_numpy(live[:, j].copy()) if live[:, j].any() else None for j in range(len(slots))]
        else:  # the common case: only slots without a trace row (pads) are routed live, in every layer
            rows = [None if row.all() else torch.from_numpy(~row)] * len(slots)
        self.health.add_rows(columns, np.count_nonzero(row) - fallback, fallback)
        targets = torch.from_numpy(ids).long()
        for j, slot in enumerate(slots):
            slot.set_target(targets[:, j], rows[j])

    def _local_ids(
        self, routing: Optional[Routing], columns: list[int], micro: int
    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """[T, L_local, k] ids of this chunk's routers (−1 or ≥ E: missing) and the [T] has-row mask."""
        if routing is None:
            raise ValueError(f"r3: micro-batch {micro} has no routing")
        if isinstance(routing, LocalTrace):
            have = list(routing.layer_columns)
            absent = [c for c in columns if c not in have]
            if absent:
                raise ValueError(f"r3: micro-batch {micro}: the trace shard lacks MoE layers "
                                 f"{[self.spec.moe_layers[c] for c in absent]} of this stage")
            ids, positions, has_row = routing.ids, [have.index(c) for c in columns], routing.has_row
        else:
            ids, positions, has_row = np.asarray(routing), columns, None
            if ids.ndim != 3 or ids.shape[1] != self.spec.num_moe_layers:
                raise ValueError(f"r3: micro-batch {micro}: routing of shape {ids.shape}, expected "
                                 f"[tokens, {self.spec.num_moe_layers}, {self.spec.topk}]")
        if positions != list(range(ids.shape[1])):
            ids = ids[:, positions]
        return np.ascontiguousarray(ids), has_row
