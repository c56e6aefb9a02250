"""Model weights and optimizer state in Megatron's distributed checkpoint format (torch_dist), every rank.

``save_model`` writes ``model.sharded_state_dict()`` with ``dist_checkpointing.save``; ``load_model`` reads it back
into a model of any parallel layout and checks that nothing but ``_extra_state`` entries is missing or unexpected.
``save_optimizer`` / ``load_optimizer`` do the same for Megatron's optimizer through its own ``sharded_state_dict``
(the Adam moments and fp32 main params as tensors sharded like the model's; the distributed optimizer's shards in
Megatron-LM's ``dp_reshardable`` format), so a checkpoint saved at one data-parallel size loads at another.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing

# Megatron-LM's default for the distributed optimizer (--dist-ckpt-optim-fully-reshardable off): the flat buffers
# saved as they are sharded, reshardable over data parallelism
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def save_model(model: torch.nn.Module, directory: str | Path) -> None:
    """Write this rank's shards of ``model`` to ``directory`` (collective: every rank calls it)."""
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))


def is_checkpoint(directory: str | Path) -> bool:
    """True if ``directory`` holds a Megatron distributed checkpoint (its ``metadata.json``)."""
    return (Path(directory) / "metadata.json").is_file()


def load_model(model: torch.nn.Module, directory: str | Path, *, what: str = "checkpoint") -> None:
    """Load ``directory`` into ``model`` in place (collective).

    Raises:
        ValueError: ``directory`` is not a Megatron checkpoint, or keys are missing / unexpected (``what`` names the
            flag or file in the message).
    """
    if not is_checkpoint(directory):
        raise ValueError(f"{what} {directory}: not a Megatron distributed checkpoint (metadata.json missing)")
    state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.endswith("_extra_state")]
    if real_missing or unexpected:
        raise ValueError(f"{what} {directory}: missing {real_missing[:5]}, unexpected {list(unexpected)[:5]}")


def save_optimizer(optimizer: Any, model: torch.nn.Module, directory: str | Path) -> None:
    """Write this rank's shards of Megatron's ``optimizer`` (over ``model``'s parameters) to ``directory``
    (collective)."""
    state = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=False, metadata=OPTIMIZER_METADATA)
    dist_checkpointing.save(state, str(directory))


def load_optimizer(optimizer: Any, model: torch.nn.Module, directory: str | Path, *, what: str = "checkpoint") -> None:
    """Load ``directory`` into ``optimizer`` in place, whatever data-parallel size saved it (collective).

    Raises:
        ValueError: ``directory`` is not a Megatron checkpoint.
    """
    if not is_checkpoint(directory):
        raise ValueError(f"{what} {directory}: not a Megatron distributed checkpoint (metadata.json missing)")
    # no_grad: for fp32 params the distributed optimizer's main params are views of the model params, which its
    # loader overwrites in place
    with torch.no_grad():
        request = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                               metadata=OPTIMIZER_METADATA)
        optimizer.load_state_dict(dist_checkpointing.load(request, str(directory)))
