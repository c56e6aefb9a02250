"""Rollouts: SGLang clients (client.py: what they share; sglang.py: HTTP; engine_client.py: in-process), the CPU
engine on HF transformers (hf_engine.py) behind SGLang's HTTP protocol (server.py, protocol.py, sampling.py),
rollout records (records.py) and weight sync to the engine (weight_sync.py, weight_names.py)."""
