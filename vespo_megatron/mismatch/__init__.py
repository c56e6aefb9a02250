"""The train-inference mismatch tool: rollouts generated once with routing capture, scored by the Megatron model of
the same checkpoint with routing replay off and on (R3).

``align`` lines up rollout and training tokens, ``score`` runs the Megatron ranks (``measure_mismatch``), ``report``
writes the table, JSON and plots, ``inputs`` makes the prompts and the rollout client, ``cli`` is
``vespo-megatron mismatch``. The formulas are :mod:`vespo_megatron.metrics.mismatch`.
"""
