"""Adapters that give other RL frameworks this project's objectives without switching frameworks.

- ``vespo_megatron.integrations.verl``: importing it registers ``vespo``, ``vespo-lin`` and ``vespo-sqrt`` in verl's
  policy-loss registry (``actor_rollout_ref.actor.policy_loss.loss_mode=vespo``).
- ``vespo_megatron.integrations.slime``: loss functions for slime's custom-loss hook
  (``--loss-type custom_loss --custom-loss-function-path vespo_megatron.integrations.slime.vespo_loss``).

Each module imports its framework (or Megatron-Core) lazily, on its own import; importing this package imports
neither.
"""
