"""One training run of the reverse task (or a probed run of the repeat task), in its own process.

A run is described by a spec {"task": "reverse" | "repeat", "seed", "init_seed", "sft_steps", "eval_prompts",
"probe": bool, "config": TrainConfig overrides}; ``seed`` seeds the run (prompts, sampling), ``init_seed`` (default:
``seed``) the starting model. It does what ``run_training`` does (preflight, the CPU rollout engine
behind the SGLang protocol, one spawned gloo rank) but the rank first installs, in its own process and without
changing the library:

- for ``reverse``: the run's inputs = ``ReverseTask`` prompts and the ``reverse`` reward (the trainer builds the
  repeat task when no --prompt-data is given), and a fixed held-out eval set (``eval_prompts`` prompts drawn with
  a seed apart from training, identical for every run of a seed) scored every ``eval_interval`` steps;
- with ``probe``: the per-update probe of ``probe.py``.

The reverse model is the tiny Qwen3-MoE of runs.py (vocab 32) after a short supervised warm-up (``sft_steps`` Adam
steps on teacher-forced reverse examples, batch 32, lr 3e-3), so that it starts with a nonzero reward: pure RL from a
random model would see almost no exact answer. The warm-up is seeded and cached per (seed, sft_steps).

    python lengthruns.py SPEC_JSON OUT_JSON WORKDIR     (runs.run_many calls it; results cached as OUT_JSON)
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from runs import VOCAB, make_checkpoint

EVAL_SEED = 987_654  # the held-out eval prompts: seed apart from every training draw
SFT_BATCH, SFT_LR = 32, 3e-3


def reverse_checkpoint(root: Path, seed: int, sft_steps: int) -> Path:
    """The tiny model of ``seed`` after ``sft_steps`` supervised steps on the reverse task (built once, cached)."""
    path = Path(root) / f"reverse-seed{seed}-sft{sft_steps}"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM

    from vespo_megatron.train.task import ReverseTask

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(root, seed), torch_dtype=torch.float32)
    task = ReverseTask(vocab_size=VOCAB)
    opt = torch.optim.Adam(model.parameters(), lr=SFT_LR)
    model.train()
    for it in range(sft_steps):
        prompts = task.prompts(SFT_BATCH, seed=10_000_000 + seed * 100_003 + it)
        rows = [p + task.target(p) for p in prompts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), task.eos, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (p, row) in enumerate(zip(prompts, rows)):
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, len(p):len(row)] = torch.tensor(row[len(p):])  # loss on the answer and its stop token only
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    return path


def prepare(spec: dict[str, Any], workdir: Path) -> str:
    """The HF checkpoint a spec starts from (made here, before any subprocess would race to write it)."""
    if spec["task"] == "reverse":
        return str(reverse_checkpoint(workdir, spec.get("init_seed", spec["seed"]), spec["sft_steps"]))
    return str(make_checkpoint(workdir, spec.get("init_seed", spec["seed"])))


def start_eval(workdir: Path, init_seed: int, sft_steps: int, eval_prompts: int, samples: int,
               max_new_tokens: int) -> dict[str, float]:
    """The start model on the held-out eval set ({"mean_reward", "response_len"}; ``samples`` per prompt, bf16 CPU
    engine at temperature 1 as the runs sample); cached as JSON beside the checkpoint."""
    name = f"start-eval-seed{init_seed}-sft{sft_steps}-p{eval_prompts}-n{samples}-t{max_new_tokens}.json"
    cache = Path(workdir) / name
    if cache.is_file():
        return json.loads(cache.read_text())
    import numpy as np

    from vespo_megatron.rollout.hf_engine import HFEngine
    from vespo_megatron.train.task import ReverseTask, reverse_prompts

    engine = HFEngine.from_pretrained(str(reverse_checkpoint(workdir, init_seed, sft_steps)), dtype="bf16")
    task = ReverseTask(vocab_size=VOCAB)
    params = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
              "stop_token_ids": [task.eos]}
    rewards, lengths = [], []
    for prompt in reverse_prompts(task, seed=EVAL_SEED).take(eval_prompts):
        for out in engine.generate([prompt.ids] * samples, params):
            rewards.append(task.reward(prompt.ids, out["output_ids"]))
            lengths.append(len(out["output_ids"]))
    result = {"mean_reward": float(np.mean(rewards)), "response_len": float(np.mean(lengths)),
              "reward_se": float(np.std(rewards, ddof=1) / np.sqrt(len(rewards)))}
    cache.write_text(json.dumps(result))
    return result


def _reverse_inputs(spec: dict[str, Any]):
    """A replacement for the trainer's ``build_inputs``: the reverse task's prompts, reward and eval set."""
    from vespo_megatron.evaluation import EvalSet
    from vespo_megatron.rewards import get_reward
    from vespo_megatron.train import inputs as inputs_mod
    from vespo_megatron.train.task import ReverseTask, reverse_prompts

    original = inputs_mod.build_inputs

    def build_inputs(cfg, vocab_size):
        base = original(cfg, vocab_size)
        task = ReverseTask(vocab_size=vocab_size, eos=base.stop_ids[0])
        held_out = reverse_prompts(task, seed=EVAL_SEED).take(spec["eval_prompts"])
        return inputs_mod.RunInputs(None, reverse_prompts(task, cfg.seed), get_reward("reverse"),
                                    [EvalSet("heldout", SimpleNamespace(prompts=held_out))], base.stop_ids,
                                    base.generation)

    return build_inputs


def worker(rank: int, cfg: Any, spec: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """The spawned rank: install the task and the probe, then the library's loop."""
    import vespo_megatron.train.trainer as trainer_mod
    from vespo_megatron.train.run import train_worker

    if spec["task"] == "reverse":
        trainer_mod.build_inputs = _reverse_inputs(spec)
    if spec.get("probe"):
        import probe

        probe.install(cfg.num_mini_batches)
    history = train_worker(rank, cfg, None, quiet)
    out: dict[str, Any] = {"history": history}
    if spec.get("probe"):
        import probe

        out["probe"] = probe.records()
    return out


def train(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One run in this process: {"config": spec, "wall_s", "rows": [{"step", metric: value}], "probe"?}."""
    from vespo_megatron.megatron.parallel import spawn
    from vespo_megatron.rollout.hf_engine import HFEngine
    from vespo_megatron.rollout.server import RolloutServer
    from vespo_megatron.train.config import TrainConfig
    from vespo_megatron.train.run import preflight

    cfg = TrainConfig(hf_checkpoint=prepare(spec, workdir), seed=spec["seed"], **spec["config"])
    preflight(cfg, 1)
    start = time.time()
    engine = HFEngine.from_pretrained(cfg.hf_checkpoint, dtype=cfg.engine_dtype)
    with RolloutServer(engine) as server:
        cfg = dataclasses.replace(cfg, sglang_url=[server.url])
        out = spawn(worker, 1, cfg, spec, True, timeout=36_000)[0]
    result = {"config": spec, "wall_s": time.time() - start,
              "rows": [{"step": it, **metrics} for it, metrics in out["history"]]}
    if "probe" in out:
        result["probe"] = out["probe"]
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    result = train(json.loads(sys.argv[1]), Path(sys.argv[3]))
    partial = Path(sys.argv[2] + ".partial")
    partial.write_text(json.dumps(result))
    partial.rename(sys.argv[2])  # the cache file appears only complete
