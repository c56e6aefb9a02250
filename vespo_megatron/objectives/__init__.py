"""Policy objectives of vespo-megatron: the VESPO loss, its baselines and ablations (pure torch).

The public API is :mod:`vespo_megatron.objectives.policy_loss` (``compute_policy_loss``, ``packed_policy_loss``,
``assemble_policy_loss``); the kernel φ(W) is :mod:`~.kernel`, the loss registry :mod:`~.losses`, aggregation
:mod:`~.aggregate`, advantages :mod:`~.advantages`, hyper-parameters :mod:`~.config`, the KL and entropy terms
:mod:`~.regularizers`. The names below are re-exported lazily, so that importing a torch-free submodule (``config``)
does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AGG_MODES": "aggregate",
    "aggregate_loss": "aggregate",
    "grpo_advantages": "advantages",
    "KL_LOSS_TYPES": "config",
    "PolicyLossConfig": "config",
    "RegularizerConfig": "config",
    "POLICY_LOSSES": "losses",
    "PolicyLossOutput": "losses",
    "PackedPolicyInput": "packed",
    "SeqSum": "packed",
    "identity_seq_sum": "packed",
    "assemble_policy_loss": "policy_loss",
    "compute_policy_loss": "policy_loss",
    "effective_agg_mode": "policy_loss",
    "packed_policy_loss": "policy_loss",
    "kl_penalty": "regularizers",
    "regularizer_per_token": "regularizers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
