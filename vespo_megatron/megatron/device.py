"""The one device of this rank: ``cuda:<LOCAL_RANK>`` when torch sees a CUDA device, else the CPU.

Every tensor the step touches lives there: the model (built on ``torch.cuda.current_device()``), the micro-batches,
the loss, the routing traces handed to the router and the weights exported for the engines. ``use_cpu`` is the
single switch between the GPU path and the CPU path (gloo, the CPU shims of :mod:`.compat`).
"""
from __future__ import annotations

import os

import torch


def use_cpu() -> bool:
    """True when this process runs on the CPU (no usable CUDA device)."""
    return not torch.cuda.is_available()


def set_local_device() -> None:
    """On CUDA, make ``cuda:$LOCAL_RANK`` the current device (before any CUDA allocation); nothing on CPU."""
    if not use_cpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def local_device() -> torch.device:
    """``cuda:<current>`` on a GPU machine, else ``cpu``."""
    return torch.device("cpu") if use_cpu() else torch.device("cuda", torch.cuda.current_device())


def to_local(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on :func:`local_device` (no copy when it is there already; asynchronous from pinned memory)."""
    return tensor.to(local_device(), non_blocking=True)
