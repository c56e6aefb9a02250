"""Push the trainer's weights to the rollout engine after a step, and check that the engine holds them.

Input: HF-named tensors ``[(name, tensor)]`` (the converter's in-memory Megatron -> HF path; checkpoint or in-memory
names). Transport, through either client of rollout/sglang.py:
- ``via="tensor"``: ``update_weights_from_tensor`` (in-process engine; SGLang HTTP with CUDA IPC on the same node);
- ``via="disk"``: write an HF directory (config.json + model.safetensors) and ``update_weights_from_disk``.
Checks (each optional, at least one must run): the engine reports ``version``; per-tensor digests equal those of the
sent tensors cast to the engine's dtype (CPU engine / ``vespo-megatron serve``); the engine's log-probs of a fixed
probe sequence match the trainer's within ``atol`` (works against any SGLang).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vespo_megatron.rollout.weight_names import mismatched_weights


class WeightSyncError(RuntimeError):
    """The engine does not hold the weights that were sent; the message says which check failed."""


@dataclass(frozen=True)
class Probe:
    """A fixed sequence [T] and the trainer's log-probs [T − 1] of its tokens 1.. (T = 1)."""

    token_ids: list[int]
    logprobs: np.ndarray
    atol: float = 1e-4


def save_hf_dir(named_tensors: Iterable[tuple[str, torch.Tensor]], hf_config: Any, path: str | Path) -> Path:
    """Write an HF directory ``from_pretrained`` / SGLang can load: config.json + model.safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(path)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in named_tensors}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def push_weights(client: Any, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str, *,
                 via: str = "tensor", hf_config: Any = None, staging_dir: str | Path | None = None) -> None:
    """Send the tensors to the engine behind ``client`` and set its weight version to ``version``."""
    if via == "tensor":
        client.update_weights_from_tensor(named_tensors, weight_version=version)
    elif via == "disk":
        if hf_config is None or staging_dir is None:
            raise ValueError("via='disk' needs hf_config and staging_dir (a directory the engine can read)")
        client.update_weights_from_disk(str(save_hf_dir(named_tensors, hf_config, staging_dir)), weight_version=version)
    else:
        raise ValueError(f"via must be 'tensor' or 'disk', got {via!r}")


def verify_weights(client: Any, *, version: str | None = None,
                   named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
                   probe: Probe | None = None) -> None:
    """Raise :class:`WeightSyncError` unless every requested check passes (version, digests, probe log-probs)."""
    if version is None and named_tensors is None and probe is None:
        raise ValueError("verify_weights needs at least one of version, named_tensors, probe")
    if version is not None and (held := client.get_weight_version()) != version:
        raise WeightSyncError(f"the engine reports weight version {held!r}, expected {version!r}")
    if named_tensors is not None:
        named = list(named_tensors)
        bad = mismatched_weights(named, client.weights_checksum([name for name, _ in named]))
        if bad:
            raise WeightSyncError(f"{len(bad)} of {len(named)} tensors differ on the engine, first: {bad[:3]}")
    if probe is not None:
        got = client.score(probe.token_ids).astype(np.float64)
        want = np.asarray(probe.logprobs, np.float64)
        if got.shape != want.shape:
            raise WeightSyncError(f"probe: the engine scored {got.size} tokens, the trainer {want.size}")
        delta = np.abs(got - want)
        if not (delta <= probe.atol).all():
            worst = int(np.argmax(delta))
            raise WeightSyncError(f"probe log-probs differ: max |Δ| = {delta[worst]:.3g} at token {worst + 1} "
                                  f"(atol {probe.atol})")
