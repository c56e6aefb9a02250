"""What a run reads besides the model: tokenizer, prompts (a dataset or the synthetic task), reward, eval sets,
stop tokens and sampling parameters, built from the config (rank 0 builds them; the preflight builds them once
before any rank starts, so that a bad file, row or reward path is reported at once)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from vespo_megatron.data import PromptDataConfig, PromptDataError, PromptDataset, eos_token_ids, load_tokenizer
from vespo_megatron.data.stream import DatasetPrompts
from vespo_megatron.errors import UsageError
from vespo_megatron.evaluation import EvalSet
from vespo_megatron.rewards import Reward, get_reward
from vespo_megatron.rollout.generation import GenerationSettings
from vespo_megatron.train.config import TrainConfig
from vespo_megatron.train.task import RepeatPrompts, RepeatTask

logger = logging.getLogger(__name__)


@dataclass
class RunInputs:
    tokenizer: Optional[Any]
    prompts: Any  # DatasetPrompts or RepeatPrompts
    reward: Reward
    eval_sets: list[EvalSet]
    stop_ids: list[int]
    generation: GenerationSettings

    def sampling_params(self, greedy: bool = False) -> dict[str, Any]:
        return self.generation.sampling_params(self.stop_ids, greedy=greedy)


def _dataset(cfg: TrainConfig, path: str, tokenizer: Any, flag: str) -> PromptDataset:
    data_cfg = PromptDataConfig(path, input_key=cfg.input_key, label_key=cfg.label_key,
                                metadata_key=cfg.metadata_key, apply_chat_template=cfg.apply_chat_template,
                                max_prompt_len=cfg.max_prompt_len, bad_rows=cfg.prompt_data_bad_rows)
    try:
        return PromptDataset.load(data_cfg, tokenizer)
    except PromptDataError as err:
        raise UsageError(flag, str(err)) from err


def build_inputs(cfg: TrainConfig, vocab_size: int) -> RunInputs:
    """The run's inputs; errors name the flag (UsageError)."""
    generation = GenerationSettings(max_response_len=cfg.max_new_tokens, temperature=cfg.temperature,
                                    top_p=cfg.rollout_top_p, top_k=cfg.rollout_top_k, stop=tuple(cfg.rollout_stop),
                                    stop_token_ids=tuple(cfg.rollout_stop_token_ids))
    try:
        reward = get_reward(cfg.reward or "repeat", cfg.custom_reward_path)
    except ValueError as err:
        flag = "--custom-reward-path" if cfg.custom_reward_path else "--reward"
        raise UsageError(flag, str(err).removeprefix(flag + ": ")) from err
    if not cfg.prompt_data:
        stop_ids = eos_token_ids(cfg.hf_checkpoint)
        task = RepeatTask(vocab_size=vocab_size, num_symbols=cfg.task_symbols,
                          **({"eos": stop_ids[0]} if stop_ids else {}))
        return RunInputs(None, RepeatPrompts(task, cfg.seed), reward, [], stop_ids or [task.eos], generation)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.hf_checkpoint)
    except ValueError as err:
        raise UsageError("--tokenizer", str(err).removeprefix("--tokenizer: ")) from err
    if cfg.apply_chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise UsageError("--apply-chat-template", f"the tokenizer of {cfg.tokenizer or cfg.hf_checkpoint} has no chat "
                         "template")
    stop_ids = eos_token_ids(cfg.hf_checkpoint, tokenizer)
    if not stop_ids and not cfg.rollout_stop:
        logger.warning("no EOS in %s or its tokenizer: responses end at --rollout-max-response-len only",
                       cfg.hf_checkpoint)
    train = _dataset(cfg, cfg.prompt_data, tokenizer, "--prompt-data")
    evals = [EvalSet(name, _dataset(cfg, path, tokenizer, "--eval-prompt-data")) for name, path in cfg.eval_prompt_data]
    for flag, data in [("--prompt-data", train)] + [("--eval-prompt-data", e.dataset) for e in evals]:
        top = max(max(p.ids) for p in data.prompts if p.ids)
        if top >= vocab_size:
            raise UsageError(flag, f"{data.path}: token id {top} >= the model's vocab_size {vocab_size} (wrong "
                             "--tokenizer?)")
    prompts = DatasetPrompts(train, shuffle=cfg.rollout_shuffle, seed=cfg.seed)
    return RunInputs(tokenizer, prompts, reward, evals, stop_ids, generation)
