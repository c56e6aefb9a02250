"""Which experts a model's MoE routers chose: the one router-capture mechanism (R2 recording, the mismatch tool, the
replay tests).

A forward hook on each router reads its routing map [T, E] (bool, k True per row; the router's output[1]) and keeps
the expert SET of every call as sorted ids [T, k] (``expert_ids``: a top-k over the map, no host synchronisation).
Calls made inside an autograd backward (activation recomputation re-running a checkpointed router) are kept apart
from forward calls. Keys are whatever the caller names each router by (trace column, layer number).
"""
from __future__ import annotations

from typing import Any, Hashable, Optional, Sequence

import torch


def in_backward() -> bool:
    """True inside an autograd backward pass (where activation recomputation re-runs the forward)."""
    return torch._C._current_graph_task_id() != -1


def expert_ids(routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """Sorted expert ids [T, topk] (int64) of a routing map [T, E] with ``topk`` True entries per row."""
    return torch.topk(routing_map.to(torch.uint8), topk, dim=1, sorted=False).indices.sort(dim=1).values


class RouterCapture:
    """Forward hooks on ``routers`` (keyed by ``keys``): the sorted expert ids [T, k] of every call.

    Args:
        routers: Megatron ``TopKRouter`` modules (``forward`` returns (probs, routing_map [T, E])).
        keys: one key per router.
        dtype: storage dtype of the ids (e.g. uint8 for ≤ 256 experts); default int64.
        active: whether calls are recorded from the start (see :attr:`active`).

    ``forward[key]`` / ``recomputed[key]``: the [T, k] ids of each call, in call order, on the router's device.
    """

    def __init__(self, routers: Sequence[torch.nn.Module], keys: Sequence[Hashable], *,
                 dtype: Optional[torch.dtype] = None, active: bool = True) -> None:
        self.keys = list(keys)
        self.dtype = dtype
        self.active = active
        self.forward: dict[Hashable, list[torch.Tensor]] = {key: [] for key in self.keys}
        self.recomputed: dict[Hashable, list[torch.Tensor]] = {key: [] for key in self.keys}
        self._handles = [router.register_forward_hook(self._hook(key))
                         for router, key in zip(routers, self.keys, strict=True)]

    def _hook(self, key: Hashable):
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if not self.active:
                return
            ids = expert_ids(output[1].detach(), module.topk)
            if self.dtype is not None:
                ids = ids.to(self.dtype)
            (self.recomputed if in_backward() else self.forward)[key].append(ids)

        return hook

    def pop(self) -> tuple[dict[Hashable, list[torch.Tensor]], dict[Hashable, list[torch.Tensor]]]:
        """(forward, recomputed) calls since the last pop; both are emptied."""
        out = (self.forward, self.recomputed)
        self.forward = {key: [] for key in self.keys}
        self.recomputed = {key: [] for key in self.keys}
        return out

    def pop_stacked(self) -> list[torch.Tensor]:
        """The forward calls since the last pop as one [T, num_keys, k] tensor per forward (keys in order)."""
        forward, _ = self.pop()
        return [torch.stack(calls, dim=1) for calls in zip(*(forward[key] for key in self.keys), strict=True)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
