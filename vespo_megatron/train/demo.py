"""The CPU demo, end to end, through the same code paths an H100 user runs:

1. a tiny random Qwen3-MoE written by transformers' ``save_pretrained`` (the HF checkpoint);
2. real conversion HF -> Megatron torch_dist (streaming converter);
3. the CPU rollout engine (transformers, bf16) behind the SGLang HTTP protocol on loopback;
4. VESPO training with R3 routing replay on 2 gloo ranks (EP2): rollouts with routed experts, GRPO advantages,
   N = 4 updates per step, weight sync to the engine after every step; per-step metrics;
5. the trained Megatron checkpoint converted back to HF, and the train-inference mismatch of fresh rollouts measured
   with replay off and on (table on stdout, JSON and PNG plots in the work directory).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from vespo_megatron.train.task import EOS, RepeatTask

logger = logging.getLogger(__name__)

STEPS = ("HF checkpoint", "convert HF -> Megatron", "rollout engine", "VESPO training (R3, EP2)", "mismatch report")


def _say(i: int, what: str) -> None:
    logger.info("[%d/%d] %s: %s", i, len(STEPS), STEPS[i - 1], what)


def make_hf_checkpoint(path: Path, seed: int) -> Path:
    from transformers import AutoModelForCausalLM

    from vespo_megatron.hf_config import tiny_hf_config

    torch.manual_seed(seed)
    config = tiny_hf_config("qwen3_moe", vocab_size=32, initializer_range=0.2)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def run_demo(workdir: str | Path, steps: int = 4, nproc: int = 2, seed: int = 0) -> dict:
    """Run the five stages in ``workdir``; returns {"history": [...], "mismatch": {column: metrics}}."""
    from transformers.utils import logging as hf_logging

    from vespo_megatron.convert.hf_to_mcore import HfToMcoreOptions, convert_hf_to_mcore
    from vespo_megatron.convert.mcore_to_hf import McoreToHfOptions, convert_mcore_to_hf
    from vespo_megatron.hf_config import load_hf_config
    from vespo_megatron.rollout.hf_engine import HFEngine
    from vespo_megatron.rollout.server import RolloutServer
    from vespo_megatron.rollout.sglang import SGLangClient
    from vespo_megatron.train import checkpoint
    from vespo_megatron.train.config import TrainConfig
    from vespo_megatron.mismatch.align import trace_spec
    from vespo_megatron.mismatch.score import measure_mismatch
    from vespo_megatron.train.run import run_training

    hf_logging.disable_progress_bar()
    start = time.time()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = make_hf_checkpoint(work / "hf", seed)
    _say(1, f"tiny random Qwen3-MoE (4 layers, 8 experts top-2) saved to {hf_dir}")

    _say(2, f"{hf_dir} -> {work / 'mcore'}")
    convert_hf_to_mcore(hf_dir, work / "mcore", HfToMcoreOptions())

    with RolloutServer(HFEngine.from_pretrained(str(hf_dir), dtype="bf16")) as server:
        _say(3, f"CPU engine (transformers, bf16) serving the SGLang protocol at {server.url}")
        cfg = TrainConfig(
            hf_checkpoint=str(hf_dir), sglang_url=[server.url], expert_model_parallel_size=2, loss="vespo",
            routing_replay="r3", rollout_batch_size=8, n_samples_per_prompt=4, num_mini_batches=4, micro_batch_size=4,
            max_new_tokens=6, lr=3e-3, train_iters=steps, seed=seed, save=str(work / "ckpt"),
            log_dir=str(work / "logs"),
        )
        _say(4, f"{steps} steps on {nproc} gloo ranks, rollout batch {cfg.rollout_batch_size} prompts x "
                f"{cfg.n_samples_per_prompt}, N = {cfg.num_mini_batches} updates per step")
        history = run_training(cfg, world_size=nproc, mcore_checkpoint=str(work / "mcore"))

        trained = checkpoint.latest(work / "ckpt") / "model"
        _say(5, f"trained weights {trained} -> {work / 'hf_trained'}; fresh rollouts, replay off vs on")
        convert_mcore_to_hf(trained, work / "hf_trained", McoreToHfOptions(hf_config=hf_dir))
        client = SGLangClient(server.url, routing=trace_spec(load_hf_config(hf_dir)))
        task = RepeatTask(vocab_size=32)
        records = client.generate(task.prompts(16, seed=seed + 999), {"max_new_tokens": 12, "stop_token_ids": [EOS]},
                                  samples_per_prompt=2, seed=seed, return_routed_experts=True)
        mismatch = measure_mismatch(work / "hf_trained", records, output_dir=work / "mismatch")
    logger.info("demo finished in %.0f s; outputs in %s", time.time() - start, work)
    return {"history": history, "mismatch": mismatch}
