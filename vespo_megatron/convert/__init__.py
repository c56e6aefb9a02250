"""HF <-> Megatron-Core checkpoint conversion for MoE models (Qwen3-MoE, Mixtral, DeepSeek-V3-style MoE as glm4_moe).

- Files: :func:`vespo_megatron.convert.hf_to_mcore.convert_hf_to_mcore` (torch_dist, optional per-rank shards) and
  :func:`vespo_megatron.convert.mcore_to_hf.convert_mcore_to_hf` (sharded safetensors), streamed per layer,
  resumable, with ``dry_run`` plans; CLI ``vespo-megatron convert`` (:mod:`vespo_megatron.convert.cli`).
- Checks: :func:`vespo_megatron.convert.verify.verify` (bitwise, tensor by tensor) and
  :func:`vespo_megatron.convert.parity.logits_parity` (HF model vs Megatron model on the same tokens).
- In memory (weight sync, tests): :mod:`vespo_megatron.convert.inmemory` over the one mapping in
  :mod:`vespo_megatron.convert.mapping`; model sizes from :func:`vespo_megatron.convert.spec.model_spec`.
"""
