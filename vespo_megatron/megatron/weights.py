"""Global (parallelism-independent) weights of a built model, through Megatron's own sharding metadata.

``model.sharded_state_dict()`` describes every local tensor as a slice of a global tensor (its dist-checkpoint key,
global shape and offset: TP/EP/PP shards, layers stacked on a leading axis, experts on a second). ``load_global``
copies the matching slice of each global tensor into the local parameter, so the same weights can be put into any
TP/PP/EP layout; ``iter_global`` assembles the global tensors one key at a time on one rank (streaming weight sync),
``export_global`` collects them into a dict.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from vespo_megatron.megatron.device import local_device


def local_shards(model: torch.nn.Module) -> Iterator[ShardedTensor]:
    """Every ShardedTensor of the model (factories such as the SwiGLU fc1 split applied), in state-dict order."""
    state = model.sharded_state_dict()
    apply_factories(state)
    stack = [state]
    while stack:
        node = stack.pop(0)
        values = node.values() if isinstance(node, dict) else node
        for value in values:
            if isinstance(value, ShardedTensor):
                if value.flattened_range is not None:
                    raise ValueError(f"{value.key}: flattened (distributed-optimizer) shards are not supported here")
                yield value
            elif isinstance(value, (dict, list, tuple)):
                stack.append(value)


def global_slice(shard: ShardedTensor) -> tuple[slice, ...]:
    """Index of ``shard`` inside its global tensor (prepended axes such as the layer index have length 1)."""
    prepend = shard.prepend_axis_num
    local = (1,) * prepend + tuple(shard.local_shape)
    return tuple(slice(o, o + n) for o, n in zip(shard.global_offset, local))


def load_global(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy each local shard's slice of ``tensors[key]`` (global shapes) into the model, in place."""
    with torch.no_grad():
        for shard in local_shards(model):
            if shard.key not in tensors:
                raise KeyError(f"global tensor {shard.key!r} is missing")
            full = tensors[shard.key]
            if tuple(full.shape) != tuple(shard.global_shape):
                raise ValueError(f"{shard.key}: global shape {tuple(full.shape)} != model's {shard.global_shape}")
            shard.data.copy_(full[global_slice(shard)].reshape(shard.data.shape))


@contextlib.contextmanager
def _grads_as_data(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily point every parameter's data at its gradient (Megatron DDP's main_grad, else .grad)."""
    swapped = []
    for param in model.parameters():
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        swapped.append((param, param.data))
        param.data = torch.zeros_like(param.data) if grad is None else grad.view_as(param.data)
    try:
        yield
    finally:
        for param, data in swapped:
            param.data = data


def iter_global(model: torch.nn.Module, dst: int = 0,
                owner: Optional[Callable[[int], int]] = None) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """(key, global tensor) one key at a time, assembled on rank ``dst`` (None on the other ranks).

    ``owner``: key number -> the rank that assembles that key instead (e.g. ``i % world``: every rank writes its own
    keys). Every rank must iterate to the end (each key is one gather). Peak memory on a rank: one global tensor.
    """
    shards: dict[str, list[ShardedTensor]] = {}
    for shard in local_shards(model):
        shards.setdefault(shard.key, []).append(shard)
    keys = [(key, tuple(group[0].global_shape), group[0].dtype) for key, group in shards.items()]
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, keys)
        keys = list(dict.fromkeys(item for rank_keys in every for item in rank_keys))
    me = dist.get_rank() if distributed else dst
    for number, (key, shape, dtype) in enumerate(keys):
        if owner is not None:
            dst = owner(number) if distributed else me
        pieces = [(global_slice(s), s.data.detach().cpu()) for s in shards.get(key, [])]
        if distributed:
            gathered: Optional[list] = [None] * dist.get_world_size() if me == dst else None
            dist.gather_object(pieces, gathered, dst=dst)
        else:
            gathered = [pieces]
        if me != dst:
            yield key, None
            continue
        full = torch.zeros(shape, dtype=dtype, device=local_device())  # pieces travel as host objects
        for index, data in (piece for rank_pieces in gathered for piece in rank_pieces):
            full[index] = data.reshape(full[index].shape)
        yield key, full


def export_global(model: torch.nn.Module, grads: bool = False, dst: int = 0) -> dict[str, torch.Tensor]:
    """key -> global tensor (of the gradients with ``grads``) on rank ``dst``; {} on the other ranks."""
    if grads:
        with _grads_as_data(model):
            return export_global(model, dst=dst)
    return {key: tensor for key, tensor in iter_global(model, dst) if tensor is not None}
