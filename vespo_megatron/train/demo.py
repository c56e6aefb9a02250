"""The CPU demo, end to end, through the same code paths an H100 user runs:

1. a tiny random Qwen3-MoE written by transformers' ``save_pretrained`` (the HF checkpoint) with a real character
   tokenizer built locally by the ``tokenizers`` library (chat template, EOS in config and generation_config), and a
   generated arithmetic prompt set in jsonl ("What is 17+25?" -> "\\boxed{42}") for training and evaluation;
2. real conversion HF -> Megatron torch_dist (streaming converter);
3. the CPU rollout engine (transformers, bf16) behind the SGLang HTTP protocol on loopback;
4. VESPO training with R3 routing replay on 2 gloo ranks (EP2): chat-templated prompts from the jsonl file, rollouts
   with routed experts stopped at the tokenizer's EOS, the ``math`` reward (math-verify), GRPO advantages, N = 4
   updates per step, weight sync to the engine after every step, evaluation (pass@k) every 2 steps;
5. the trained Megatron checkpoint converted back to HF, and the train-inference mismatch of fresh rollouts of the
   eval prompts measured with replay off and on (table on stdout, JSON and PNG plots in the work directory).

Nothing is fetched from a hub. The random model does not learn arithmetic in 4 steps; the demo runs every stage of a
real run.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

STEPS = ("HF checkpoint", "convert HF -> Megatron", "rollout engine", "VESPO training (R3, EP2)", "mismatch report")


def _say(i: int, what: str) -> None:
    logger.info("[%d/%d] %s: %s", i, len(STEPS), STEPS[i - 1], what)


def make_hf_checkpoint(path: Path, seed: int) -> Path:
    """The tiny random Qwen3-MoE with the character tokenizer (vocabulary 96 ≥ the tokenizer's 84 tokens)."""
    from transformers import AutoModelForCausalLM

    from vespo_megatron.data.arithmetic import build_tokenizer
    from vespo_megatron.hf_config import tiny_hf_config

    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    config = tiny_hf_config("qwen3_moe", vocab_size=96, initializer_range=0.2, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def make_prompt_data(work: Path, seed: int, num_train: int = 256, num_eval: int = 8) -> tuple[Path, Path]:
    """Train and eval arithmetic sets in jsonl (disjoint seeds)."""
    from vespo_megatron.data.arithmetic import arithmetic_rows, write_jsonl

    return (write_jsonl(arithmetic_rows(num_train, seed), work / "arith_train.jsonl"),
            write_jsonl(arithmetic_rows(num_eval, seed + 1), work / "arith_eval.jsonl"))


def run_demo(workdir: str | Path, steps: int = 4, nproc: int = 2, seed: int = 0) -> dict:
    """Run the five stages in ``workdir``; returns {"history": [...], "mismatch": {column: metrics}}."""
    from transformers.utils import logging as hf_logging

    from vespo_megatron.convert.hf_to_mcore import HfToMcoreOptions, convert_hf_to_mcore
    from vespo_megatron.data import PromptDataConfig, PromptDataset, eos_token_ids, load_tokenizer
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
    train_data, eval_data = make_prompt_data(work, seed)
    _say(1, f"tiny random Qwen3-MoE (4 layers, 8 experts top-2) and its character tokenizer saved to {hf_dir}; "
            f"prompts {train_data.name}, eval set {eval_data.name}")

    _say(2, f"{hf_dir} -> {work / 'mcore'}")
    convert_hf_to_mcore(hf_dir, work / "mcore", HfToMcoreOptions())

    with RolloutServer(HFEngine.from_pretrained(str(hf_dir), dtype="bf16")) as server:
        _say(3, f"CPU engine (transformers, bf16) serving the SGLang protocol at {server.url}")
        cfg = TrainConfig(
            hf_checkpoint=str(hf_dir), sglang_url=[server.url], expert_model_parallel_size=2, loss="vespo",
            routing_replay="r3", rollout_batch_size=8, n_samples_per_prompt=4, num_mini_batches=4, micro_batch_size=4,
            max_new_tokens=12, lr=3e-3, train_iters=steps, seed=seed, save=str(work / "ckpt"),
            tensorboard_dir=str(work / "logs"), prompt_data=str(train_data), input_key="prompt", label_key="label",
            metadata_key="metadata", apply_chat_template=True, rollout_shuffle=True, reward="math",
            eval_prompt_data=[["arith", str(eval_data)]], eval_interval=2, n_samples_per_eval_prompt=2,
        )
        _say(4, f"{steps} steps on {nproc} gloo ranks, rollout batch {cfg.rollout_batch_size} prompts x "
                f"{cfg.n_samples_per_prompt}, N = {cfg.num_mini_batches} updates per step")
        history = run_training(cfg, world_size=nproc, mcore_checkpoint=str(work / "mcore"))

        trained = checkpoint.latest(work / "ckpt") / "model"
        _say(5, f"trained weights {trained} -> {work / 'hf_trained'}; fresh rollouts, replay off vs on")
        convert_mcore_to_hf(trained, work / "hf_trained", McoreToHfOptions(hf_config=hf_dir))
        client = SGLangClient(server.url, routing=trace_spec(load_hf_config(hf_dir)))
        tokenizer = load_tokenizer(hf_dir)
        prompts = PromptDataset.load(PromptDataConfig(str(eval_data), label_key="label", apply_chat_template=True),
                                     tokenizer)
        params = {"max_new_tokens": 12, "stop_token_ids": eos_token_ids(hf_dir, tokenizer)}
        records = client.generate([p.ids for p in prompts.prompts], params, samples_per_prompt=2, seed=seed,
                                  return_routed_experts=True)
        mismatch = measure_mismatch(work / "hf_trained", records, output_dir=work / "mismatch")
    logger.info("demo finished in %.0f s; outputs in %s", time.time() - start, work)
    return {"history": history, "mismatch": mismatch}
