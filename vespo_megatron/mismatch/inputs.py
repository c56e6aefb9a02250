"""The mismatch tool's inputs: prompts (random or from a file) and the rollout client that samples them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vespo_megatron.routing.trace import TraceSpec


def synthetic_prompts(num_prompts: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``num_prompts`` prompts of ``prompt_len`` token ids drawn uniformly from [0, vocab_size) (numpy, seeded)."""
    if num_prompts < 1 or prompt_len < 1:
        raise ValueError(f"num_prompts and prompt_len must be >= 1, got {num_prompts} and {prompt_len}")
    return np.random.default_rng(seed).integers(0, vocab_size, size=(num_prompts, prompt_len)).tolist()


def read_prompts(path: str | Path, vocab_size: int) -> list[list[int]]:
    """Prompts from a JSON-lines file, one non-empty list of token ids in [0, vocab_size) per line."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not JSON ({err})") from err
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids)):
            raise ValueError(f"{path}, line {number}: expected a non-empty list of token ids in [0, {vocab_size})")
        prompts.append(ids)
    if not prompts:
        raise ValueError(f"{path}: no prompt")
    return prompts


def rollout_client(hf_dir: str | Path, spec: TraceSpec, *, sglang_url: str | None = None, engine_dtype: str = "bf16",
                   seed: int = 0) -> Any:
    """A client of the SGLang server at ``sglang_url``, or of the CPU engine on ``hf_dir`` started in this process."""
    from vespo_megatron.rollout.engine_client import SGLangEngineClient
    from vespo_megatron.rollout.sglang import SGLangClient

    if sglang_url:
        return SGLangClient(sglang_url, routing=spec)
    from vespo_megatron.rollout.hf_engine import HFEngine

    return SGLangEngineClient(HFEngine.from_pretrained(str(hf_dir), dtype=engine_dtype, seed=seed), routing=spec)
