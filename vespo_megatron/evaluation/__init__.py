"""Evaluation of the current policy on held-out prompt sets (``--eval-prompt-data NAME PATH``)."""
from vespo_megatron.evaluation.loop import EvalSet, evaluate

__all__ = ["EvalSet", "evaluate"]
