"""Policy objectives of vespo-megatron: the VESPO loss, its baselines and ablations (pure torch).

The public API is :mod:`vespo_megatron.objectives.policy_loss` (``compute_policy_loss``, ``packed_policy_loss``);
the kernel φ(W) is :mod:`~.kernel`, the loss registry :mod:`~.losses`, aggregation :mod:`~.aggregate`, advantages
:mod:`~.advantages`. The names below are re-exported for convenience.
"""
from vespo_megatron.objectives.advantages import grpo_advantages
from vespo_megatron.objectives.aggregate import AGG_MODES, aggregate_loss
from vespo_megatron.objectives.config import PolicyLossConfig
from vespo_megatron.objectives.losses import POLICY_LOSSES, PolicyLossOutput
from vespo_megatron.objectives.packed import PackedPolicyInput, SeqSum, identity_seq_sum
from vespo_megatron.objectives.policy_loss import (
    assemble_policy_loss,
    compute_policy_loss,
    effective_agg_mode,
    packed_policy_loss,
)

__all__ = [
    "AGG_MODES",
    "POLICY_LOSSES",
    "PackedPolicyInput",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "SeqSum",
    "aggregate_loss",
    "assemble_policy_loss",
    "compute_policy_loss",
    "effective_agg_mode",
    "grpo_advantages",
    "identity_seq_sum",
    "packed_policy_loss",
]
