"""The process group a trainer (rank 0) shares with rollout engines' ranks to broadcast weights (SGLang's
``/init_weights_update_group`` + ``/update_weights_from_distributed``).

SGLang 0.5.23's engine joins as rank ``rank_offset + tp_rank`` through ``init_custom_process_group``
(``srt/utils/common.py``): a ``tcp://master_address:master_port`` rendezvous whose store rank 0 hosts, wrapped in
``PrefixStore(group_name)``, then torch's ``_new_process_group_helper`` (which adds the prefixes ``{group_name}/`` and
``{device}/``). :func:`open_group` builds the same store layout and constructs the gloo / NCCL backend object directly,
without registering a global group name, so a trainer and a CPU stand-in engine may share one process; a test pairs
it with the helper path. Each update request names tensors [names], dtypes and shapes; the engine then receives one
broadcast per tensor from rank 0, in that order (``weight_updater.py`` ``receive_weights_from_distributed``).
"""
from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


@dataclass
class WeightGroup:
    """One member of a weight-update group: ``broadcast`` in place, from rank 0 (the trainer)."""

    backend: Any
    rank: int
    world_size: int
    name: str
    device: torch.device
    _store: Any = None  # keeps the rendezvous store (and the server it hosts on rank 0) alive

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Broadcast ``tensor`` (contiguous, on :attr:`device`) from ``src`` to every member, in place."""
        options = dist.BroadcastOptions()
        options.rootRank = src
        options.rootTensor = 0
        self.backend.broadcast([tensor], options).wait()

    def close(self) -> None:
        """Release the backend (NCCL communicators are shut down; gloo's close with the object)."""
        shutdown = getattr(self.backend, "shutdown", None)
        if callable(shutdown) and self.device.type == "cuda":
            shutdown()
        self.backend = None
        self._store = None


def open_group(master_address: str, master_port: int, rank: int, world_size: int,
               group_name: str = "weight_update_group", backend: str = "nccl", timeout_s: float = 300.0) -> WeightGroup:
    """Join (rank 0: host) the group; blocks until all ``world_size`` members joined.

    Args:
        master_address, master_port: where rank 0 (the trainer) hosts the rendezvous store.
        rank: this member's rank (trainer 0; engine ranks rank_offset + tp_rank).
        world_size: 1 + the engines' ranks.
        group_name: the name every member passes (the store prefix).
        backend: "nccl" (CUDA tensors) or "gloo" (CPU tensors).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside the group of world_size {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=rank == 0, timeout=timeout,
                          multi_tenant=True)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    prefixed = dist.PrefixStore(f"{device.type}/", dist.PrefixStore(f"{group_name}/",
                                                                    dist.PrefixStore(group_name, store)))
    if backend == "gloo":
        member = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    else:
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
        options._timeout = timeout
        member = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    return WeightGroup(member, rank, world_size, group_name, device, store)


def receive_tensors(group: WeightGroup, names: Sequence[str], dtypes: Sequence[str],
                    shapes: Sequence[Sequence[int]]) -> list[tuple[str, torch.Tensor]]:
    """The engine side of one update: one broadcast from rank 0 per tensor, in order -> [(name, tensor)]."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
    received = []
    for name, dtype, shape in zip(names, dtypes, shapes):
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"weight {name!r}: unknown dtype {dtype!r}")
        tensor = torch.empty([int(s) for s in shape], dtype=getattr(torch, dtype), device=group.device)
        group.broadcast(tensor)
        received.append((name, tensor))
    return received
