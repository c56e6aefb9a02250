"""vespo-megatron: VESPO off-policy RL, MoE routing replay and HF <-> Megatron conversion on Megatron-Core."""

__version__ = "0.1.0"
