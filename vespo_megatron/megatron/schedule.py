"""The learning-rate schedule: Megatron-Core's own ``OptimizerParamScheduler`` over a Megatron optimizer.

One scheduler step per optimizer step (Megatron-LM's iteration); here an RL step takes N of them. Warm-up is linear
from 0 to ``lr`` over ``warmup_iters`` optimizer steps, then ``decay_style`` goes from ``lr`` to ``min_lr`` over the
remaining ``decay_iters − warmup_iters`` steps (constant: stays at ``lr``). Weight decay is constant. The state is a
pure function of the number of optimizer steps taken, so a resumed run recreates it with ``start`` (no state saved).
"""
from __future__ import annotations

from typing import Any

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def lr_scheduler(optimizer: Any, *, lr: float, min_lr: float, decay_style: str, warmup_iters: int, decay_iters: int,
                 weight_decay: float, start: int = 0) -> OptimizerParamScheduler:
    """An OptimizerParamScheduler that has taken ``start`` steps; it sets every param group's lr and weight decay.

    Args:
        optimizer: a Megatron optimizer (``build_optimizer``, whose param groups carry ``max_lr`` = ``lr`` and
            ``min_lr``: the scheduler reads the bounds from the groups).
        lr, min_lr: peak and final learning rate.
        decay_style: constant, linear, cosine or inverse-square-root.
        warmup_iters, decay_iters: optimizer steps of warm-up and of the whole schedule (warmup < decay).
        weight_decay: constant weight decay.
        start: optimizer steps already taken (a resumed run).
    Returns:
        the scheduler; call ``step(1)`` after each optimizer step.
    """
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=min_lr, lr_warmup_steps=warmup_iters, lr_decay_steps=decay_iters,
        lr_decay_style=decay_style, start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=decay_iters,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    if start:
        scheduler.step(start)
    return scheduler


def current_lr(optimizer: Any) -> float:
    """The learning rate the optimizer's first param group steps with."""
    return float(optimizer.param_groups[0]["lr"])
