"""The tokenizer of a run, from a local directory only (``--tokenizer``, else ``--hf-checkpoint``), and its stop ids.

Stop ids come from the model's files, never from constants: the ``eos_token_id`` (an int or a list) of
``generation_config.json`` and ``config.json`` when present, and the tokenizer's EOS token.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
    """``AutoTokenizer`` of a local directory (``local_files_only``: nothing is fetched from a hub)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--tokenizer: {path} is not a directory with tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"--tokenizer: no usable tokenizer in {path} ({err})") from None


def eos_token_ids(model_dir: str | Path | None, tokenizer: Any = None) -> list[int]:
    """Sorted stop ids: ``eos_token_id`` (int or list) of the model directory's generation_config.json and
    config.json, and the tokenizer's EOS."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        file = Path(model_dir) / name if model_dir is not None else None
        if file is not None and file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids |= set(value) if isinstance(value, list) else ({value} if value is not None else set())
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(int(i) for i in ids)
