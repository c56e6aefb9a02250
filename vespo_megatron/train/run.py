"""Launch a training run: the CPU rollout engine behind the SGLang protocol (unless a server URL is given), then
the trainer on N gloo ranks (``spawn``) or, under torchrun/slurm, on the ranks already started."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from contextlib import ExitStack
from typing import Optional

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vespo_megatron.errors import UsageError
from vespo_megatron.train.config import TrainConfig
from vespo_megatron.train.logger import MetricsLogger

log = logging.getLogger(__name__)


def default_world_size(cfg: TrainConfig) -> int:
    """The smallest world for the layout: pp · lcm(tp·cp, etp·ep)."""
    dense = cfg.tensor_model_parallel_size * cfg.context_parallel_size
    experts = cfg.expert_tensor_parallel_size * cfg.expert_model_parallel_size
    return cfg.pipeline_model_parallel_size * math.lcm(dense, experts)


def data_parallel_size(cfg: TrainConfig, world: int) -> int:
    """Megatron's data-parallel size of the dense layers: world / (tp·cp·pp)."""
    return world // (cfg.tensor_model_parallel_size * cfg.context_parallel_size * cfg.pipeline_model_parallel_size)


def train_worker(rank: int, cfg: TrainConfig, mcore_checkpoint: Optional[str] = None, quiet: bool = False) -> list:
    """The loop on one rank; returns [(iteration, metrics)] on rank 0."""
    from vespo_megatron.train.trainer import Trainer

    trainer = Trainer(cfg, mcore_checkpoint)
    logger = MetricsLogger(cfg.tensorboard_dir, cfg.wandb_project, dataclasses.asdict(cfg)) if rank == 0 else None
    history = []
    bar = tqdm(total=cfg.train_iters, initial=trainer.iteration, desc="train", disable=rank != 0 or quiet,
               dynamic_ncols=True)
    try:
        with logging_redirect_tqdm():  # metric lines go through logging without breaking the bar
            while trainer.iteration < cfg.train_iters:
                result = trainer.step()
                if rank == 0:
                    history.append((result.iteration, result.metrics))
                    logger.log(result.iteration, result.metrics)
                    bar.update(1)
                    bar.set_postfix(reward=f"{result.metrics['reward_mean']:.3f}",
                                    loss=f"{result.metrics['loss']:.4f}",
                                    step_s=f"{result.metrics['timing/step']:.2f}",
                                    tok_s=f"{result.metrics['throughput/tokens_per_s']:.0f}")
                    if not quiet and (result.iteration + 1) % cfg.log_interval == 0:
                        log.info(MetricsLogger.line(result.iteration, result.metrics))
                if cfg.save and cfg.save_interval and trainer.iteration % cfg.save_interval == 0:
                    trainer.save()
            if cfg.save and not (cfg.save_interval and trainer.iteration % cfg.save_interval == 0):
                trainer.save()
    finally:
        bar.close()
        trainer.close()
        if logger:
            logger.close()
    return history


def preflight(cfg: TrainConfig, world_size: Optional[int] = None, mcore_checkpoint: Optional[str] = None) -> None:
    """Every check that can fail before any work (UsageError naming the flag): config, HF checkpoint, initial and
    resume checkpoints, world size, engine."""
    from vespo_megatron import preflight as check
    from vespo_megatron.hf_config import HFConfigError, load_hf_config

    cfg.check_flags()  # the cheap checks first: no torch or transformers import before a path error
    check.hf_dir(cfg.hf_checkpoint, "--hf-checkpoint")
    if mcore_checkpoint:
        check.mcore_checkpoint(mcore_checkpoint, "--mcore-checkpoint")
    world = world_size or default_world_size(cfg)
    if world % default_world_size(cfg):
        raise UsageError("--nproc", f"{world} is not a multiple of pp·lcm(tp·cp, etp·ep) = {default_world_size(cfg)}")
    dp = data_parallel_size(cfg, world)
    if cfg.samples_per_optimizer_step % dp:
        raise UsageError("--global-batch-size", f"{cfg.samples_per_optimizer_step} samples per optimizer step do not "
                         f"split over {dp} data-parallel ranks (world {world} / (tp·cp·pp))")
    for url in cfg.sglang_url or []:
        check.reachable(url)
    cfg.validate()
    try:
        hf = load_hf_config(cfg.hf_checkpoint)
    except HFConfigError as err:
        raise UsageError("--hf-checkpoint", str(err)) from err
    from vespo_megatron.train.inputs import build_inputs

    build_inputs(cfg, hf.vocab_size)  # files, rows, tokenizer and reward: reported before any rank starts
    if cfg.load:
        from vespo_megatron.train import checkpoint

        try:
            checkpoint.check_compatible(cfg.load, hf)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError("--load", str(err).removeprefix("--load ")) from err


def run_training(cfg: TrainConfig, world_size: Optional[int] = None, mcore_checkpoint: Optional[str] = None,
                 quiet: bool = False) -> list:
    """Start the engine if needed and train; returns rank 0's history [(iteration, metrics)]."""
    preflight(cfg, world_size, mcore_checkpoint)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun / srun
        if cfg.sglang_url is None:
            raise UsageError("--sglang-url", "required under torchrun/srun (start the rollout engine separately)")
        return train_worker(int(os.environ["RANK"]), cfg, mcore_checkpoint, quiet)
    from transformers.utils import logging as hf_logging

    from vespo_megatron.megatron.parallel import spawn

    hf_logging.disable_progress_bar()  # the engine reloads weights every step
    with ExitStack() as stack:
        if cfg.sglang_url is None:
            from vespo_megatron.rollout.hf_engine import HFEngine
            from vespo_megatron.rollout.server import RolloutServer

            engine = HFEngine.from_pretrained(cfg.hf_checkpoint, dtype=cfg.engine_dtype)
            server = stack.enter_context(RolloutServer(engine))
            cfg = dataclasses.replace(cfg, sglang_url=[server.url])
        return spawn(train_worker, world_size or default_world_size(cfg), cfg, mcore_checkpoint, quiet)[0]
