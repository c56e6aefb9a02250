"""Rank function of the device tests (module level, for ``spawn``): where the model, a micro-batch, the loss path's
log-probs and the exported weights live, and the old-log-prob pass's output."""
from __future__ import annotations

import torch

from tests.distributed.parallel_cases import make_samples, micro_batches
from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.megatron.device import local_device
from vespo_megatron.megatron.model import build_model
from vespo_megatron.megatron.parallel import init_parallel
from vespo_megatron.megatron.step import old_log_probs, wrap_ddp
from vespo_megatron.megatron.weights import export_global


def placement(rank: int) -> dict:
    """Devices (as strings) of this rank's model params, micro-batch tensors, log-probs and exported weights."""
    init_parallel()
    model = build_model(tiny_hf_config("qwen3_moe"), dtype=torch.float32)
    ddp = wrap_ddp(model)
    mbs = micro_batches(make_samples(4), 2, 1, 0, 1, 0)
    logps = old_log_probs(ddp, mbs)
    mb = mbs[0]
    tensors = [mb.tokens, mb.position_ids, mb.labels, mb.loss_mask, mb.seq_ids, mb.advantages, mb.seq_advantages,
               mb.cu_seqlens, mb.cu_seqlens_padded, mb.rollout_log_prob, mb.rollout_valid]
    return {
        "local": str(local_device()),
        "params": {str(p.device) for p in model.parameters()},
        "grad_buffers": {str(p.main_grad.device) for p in model.parameters()},
        "batch": {str(t.device) for t in tensors},
        "cu_dtype": str(mb.cu_seqlens.dtype),
        "logp": {str(lp.device) for lp in logps},
        "logp_dtype": {str(lp.dtype) for lp in logps},
        "export": {str(t.device) for t in export_global(model).values()},
        "use_cpu_initialization": model.config.use_cpu_initialization,
    }
