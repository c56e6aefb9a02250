"""MoE routing replay: rollout traces (trace.py), per-rank shards (shard.py), replay in Megatron's routers
(replay.py), health counters (health.py) and the CLI flags (args.py)."""
