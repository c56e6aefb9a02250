"""Training checkpoints: Megatron distributed checkpoints of the model and of the optimizer (sharded Adam state,
resumable at another data-parallel size), every rank's RNG state and the data position (the next iteration and policy
version), so a resumed run reproduces the uninterrupted one.

Layout of ``<dir>/iter_<n>/``: ``model/`` and ``optimizer/`` (torch_dist), ``rng_<r>.pt`` (torch/numpy/python RNG of
rank r), ``meta.json`` (iteration, version, world size, the model's HF architecture fields, the prompt source's
position). A save is atomic: every rank writes into ``iter_<n>.partial/``, rank 0 renames it to ``iter_<n>`` once
all ranks are done, then replaces ``<dir>/latest`` (written to a temporary file and renamed). A save killed at any
point leaves ``latest`` naming the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vespo_megatron.megatron.checkpointing import load_model, load_optimizer, save_model, save_optimizer

ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok")


def architecture(hf_config: Any) -> dict[str, Any]:
    return {name: getattr(hf_config, name, None) for name in ARCH_FIELDS}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(root: str | Path, iteration: int, version: int, model: torch.nn.Module, optimizer: Any,
         hf_config: Any, data_state: dict[str, Any] | None = None) -> Path:
    """Write ``root/iter_<iteration>`` on every rank (collective), then point ``root/latest`` at it; ``data_state``
    is the prompt source's position after the last trained batch."""
    final = Path(root) / f"iter_{iteration:07d}"
    partial = final.with_name(final.name + ".partial")
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # the leftover of a killed save
        (partial / "model").mkdir(parents=True)
        (partial / "optimizer").mkdir()
    _barrier()
    save_model(model, partial / "model")
    save_optimizer(optimizer, model, partial / "optimizer")
    torch.save({"torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                "python_rng": random.getstate()}, partial / f"rng_{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        meta = {"iteration": iteration, "version": version, "world_size": _world(),
                "architecture": architecture(hf_config), "data": data_state}
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # a second save of the same iteration
            shutil.rmtree(final)
        os.replace(partial, final)
        _replace_text(Path(root) / "latest", final.name)
    _barrier()
    return final


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
    """Restore model, optimizer and RNG state in place (collective); returns meta (iteration, version).

    The world size may differ from the saving run's (the optimizer state is resharded); rank r then takes the RNG
    state of saved rank r mod the saved world size."""
    meta = check_compatible(root, hf_config)
    path = latest(root)
    load_model(model, path / "model", what="--load")
    load_optimizer(optimizer, model, path / "optimizer", what="--load")
    rng = torch.load(path / f"rng_{_rank() % meta['world_size']}.pt", weights_only=False)
    torch.set_rng_state(rng["torch_rng"])
    np.random.set_state(rng["numpy_rng"])
    random.setstate(rng["python_rng"])
    return meta
