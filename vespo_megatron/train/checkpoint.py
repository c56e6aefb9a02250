"""Training checkpoints: Megatron distributed checkpoint of the model, per-rank optimizer and RNG state, and the
data position (the next iteration and policy version), so a resumed run reproduces the uninterrupted one.

Layout of ``<dir>/iter_<n>/``: ``model/`` (torch_dist), ``rank_<r>.pt`` (optimizer state, torch/numpy/python RNG),
``meta.json`` (iteration, version, the model's HF architecture fields, the prompt source's position).
``<dir>/latest`` names the newest iteration; it is written last, so an interrupted save is never picked up.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vespo_megatron.megatron.checkpointing import load_model, save_model

ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok")


def architecture(hf_config: Any) -> dict[str, Any]:
    return {name: getattr(hf_config, name, None) for name in ARCH_FIELDS}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(root: str | Path, iteration: int, version: int, model: torch.nn.Module, optimizer: Any,
         hf_config: Any, data_state: dict[str, Any] | None = None) -> Path:
    """Write ``root/iter_<iteration>`` on every rank, then point ``root/latest`` at it; ``data_state`` is the prompt
    source's position after the last trained batch."""
    path = Path(root) / f"iter_{iteration:07d}"
    (path / "model").mkdir(parents=True, exist_ok=True)
    _barrier()
    save_model(model, path / "model")
    torch.save({
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
    }, path / f"rank_{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        meta = {"iteration": iteration, "version": version, "architecture": architecture(hf_config),
                "data": data_state}
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        (Path(root) / "latest").write_text(path.name)
    _barrier()
    return path


def latest(root: str | Path) -> Path:
    marker = Path(root) / "latest"
    if not marker.is_file():
        raise FileNotFoundError(f"--load {root}: no finished checkpoint (missing {marker})")
    return Path(root) / marker.read_text().strip()


def check_compatible(root: str | Path, hf_config: Any) -> dict[str, Any]:
    """meta.json of the latest checkpoint; ValueError if it was saved from another model."""
    path = latest(root)
    meta = json.loads((path / "meta.json").read_text())
    saved, current = meta["architecture"], architecture(hf_config)
    diff = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
    if diff:
        raise ValueError(f"--load {path}: checkpoint of another model; (saved, current) differ in {diff}")
    return meta


def load(root: str | Path, model: torch.nn.Module, optimizer: Any, hf_config: Any) -> dict[str, Any]:
    """Restore model, optimizer and RNG state in place; returns meta (iteration, version)."""
    meta = check_compatible(root, hf_config)
    path = latest(root)
    load_model(model, path / "model", what="--load")
    rank_state = torch.load(path / f"rank_{_rank()}.pt", weights_only=False)
    optimizer.load_state_dict(rank_state["optimizer"])
    torch.set_rng_state(rank_state["torch_rng"])
    np.random.set_state(rank_state["numpy_rng"])
    random.setstate(rank_state["python_rng"])
    return meta
