"""Rank functions for the precision / distributed-optimizer / checkpoint tests (module level, for ``spawn``).

``train_steps`` builds the model under a layout, loads the 1-rank weights, wraps it (bf16: Float16Module) and runs
optimizer steps of Megatron's Adam (plain or distributed) on fixed micro-batches; it returns per step the loss and
grad norm and, at the end, the global weights, the dtypes of the optimizer's main params and of the logits path.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

import torch
from megatron.core import parallel_state

from tests.distributed.parallel_cases import micro_batches
from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.megatron.loss import LossSettings
from vespo_megatron.megatron.model import build_model
from vespo_megatron.megatron.parallel import init_parallel
from vespo_megatron.megatron.step import build_optimizer, forward_backward, wrap_ddp, zero_grads
from vespo_megatron.megatron.weights import export_global, load_global
from vespo_megatron.packing.sample import Sample
from vespo_megatron.train import checkpoint

ADAM = dict(lr=1e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0)


def build(layout: dict, family: str, dtype: torch.dtype, weights: dict, distributed_optimizer: bool):
    """(model, ddp, optimizer) of this rank under ``layout`` with the 1-rank ``weights`` loaded."""
    init_parallel(**layout)
    model = build_model(tiny_hf_config(family), dtype=dtype)
    load_global(model, weights)
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed_optimizer)
    return model, ddp, build_optimizer(ddp, **ADAM)


def one_step(ddp, optimizer, samples: list[Sample], n_micro: int) -> tuple[Optional[float], float]:
    """One optimizer step on ``samples`` (old log-probs = rollout log-probs); (loss on the reporting rank, norm)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    sp = parallel_state.get_tensor_model_parallel_world_size()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    zero_grads(ddp)
    mbs = micro_batches(samples, n_micro, sp, tp_rank, dp, dp_rank)
    metrics = forward_backward(ddp, mbs, LossSettings(name="vespo", old_from_rollout=True))
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer step failed"
    loss = float(sum(m["loss"] for m in metrics)) if metrics else None
    return loss, float(grad_norm)


def main_param_dtypes(optimizer) -> set:
    """dtypes of the tensors Adam updates (the main params), over every chained optimizer."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return {str(p.dtype) for opt in chained for group in opt.optimizer.param_groups for p in group["params"]}


def train_steps(rank: int, layout: dict, family: str, dtype: torch.dtype, weights: dict, batches: list,
                n_micro: int = 2, distributed_optimizer: bool = False, save: Optional[str] = None,
                load: Optional[str] = None) -> dict:
    """Optional ``load`` (checkpoint root), one step per entry of ``batches``, optional ``save`` after them."""
    model, ddp, optimizer = build(layout, family, dtype, weights, distributed_optimizer)
    if load:
        checkpoint.load(load, model, optimizer, model.hf_config)
    losses, norms = [], []
    for samples in batches:
        loss, norm = one_step(ddp, optimizer, samples, n_micro)
        losses.append(loss)
        norms.append(norm)
    if save:
        checkpoint.save(save, len(batches), len(batches), model, optimizer, model.hf_config)
    report = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    return {"losses": losses, "norms": norms, "report": report, "weights": export_global(model),
            "main_dtypes": main_param_dtypes(optimizer), "param_dtypes": {str(p.dtype) for p in model.parameters()}}


def killed_during_save(rank: int, family: str, weights: dict, batches: list, root: str) -> None:
    """Save one checkpoint, then die by SIGKILL inside the next save, after its first shard files are written."""
    from megatron.core import dist_checkpointing

    model, ddp, optimizer = build({}, family, torch.float64, weights, False)
    one_step(ddp, optimizer, batches[0], 2)
    checkpoint.save(root, 1, 1, model, optimizer, model.hf_config)
    one_step(ddp, optimizer, batches[1], 2)
    real_save = dist_checkpointing.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    dist_checkpointing.save = save_then_die
    checkpoint.save(root, 2, 2, model, optimizer, model.hf_config)
