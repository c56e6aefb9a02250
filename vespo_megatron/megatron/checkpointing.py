"""Model weights in Megatron's distributed checkpoint format (torch_dist), saved and loaded by every rank.

``save_model`` writes ``model.sharded_state_dict()`` with ``dist_checkpointing.save``; ``load_model`` reads it back
into a model of any parallel layout and checks that nothing but ``_extra_state`` entries is missing or unexpected.
"""
from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing


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
