"""A prompt dataset: rows of a file -> token ids, label and metadata per prompt, with bad rows named or counted.

A row's input (``input_key``) is a string or a list of chat messages ``[{"role", "content"}, ...]``. With
``apply_chat_template`` a string becomes one user message and the messages are rendered by the tokenizer's chat
template with the generation prompt, then tokenised without adding special tokens again; without it a string is
tokenised as is (messages then need the template). Keys may be dotted paths into nested columns
(``reward_model.ground_truth``). The metadata column holds a dict or a JSON string of one.

Bad rows: a missing key, an empty prompt, an input that is neither text nor messages, metadata that is not a dict
and (in jsonl) a line that is not JSON are errors naming the file and the row, or with ``bad_rows="skip"`` dropped
and counted by reason; a prompt longer than ``max_prompt_len`` tokens is always dropped and counted (the flag asks
for it). Counts are in ``PromptDataset.filtered`` and logged.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from vespo_megatron.data.source import PromptDataError, load_rows

logger = logging.getLogger(__name__)

BAD_ROWS = ("error", "skip")
_MISSING = object()


@dataclass(frozen=True)
class PromptDataConfig:
    """Where the prompts are and how to read them (``--prompt-data`` and friends)."""

    path: str
    input_key: str = "prompt"
    label_key: Optional[str] = None
    metadata_key: Optional[str] = None
    apply_chat_template: bool = False
    max_prompt_len: Optional[int] = None
    bad_rows: str = "error"

    def validate(self) -> "PromptDataConfig":
        if self.bad_rows not in BAD_ROWS:
            raise ValueError(f"--prompt-data-bad-rows: {' or '.join(BAD_ROWS)}, got {self.bad_rows!r}")
        if self.max_prompt_len is not None and self.max_prompt_len < 1:
            raise ValueError(f"--max-prompt-len: must be >= 1, got {self.max_prompt_len}")
        if not self.input_key:
            raise ValueError("--input-key: must not be empty")
        return self


@dataclass(frozen=True)
class Prompt:
    """One usable prompt: ``row`` is its row in the file, ``ids`` its token ids [P]."""

    row: int
    ids: list[int]
    text: str
    label: Any
    metadata: dict[str, Any]


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def get_field(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, or the dotted path ``a.b`` into nested dicts; ``_MISSING`` (or None values) when absent."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _messages(value: Any) -> Optional[list[dict[str, str]]]:
    """The value as chat messages, or None when it is not a list of {"role", "content"} dicts."""
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
           for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def render(value: Any, tokenizer: Any, apply_chat_template: bool) -> tuple[str, bool]:
    """The prompt text of one input value and whether it is already rendered by the chat template.

    Raises:
        _BadRow: empty prompt, or a value that is neither text nor chat messages (or messages without template).
    """
    if value is _MISSING or value is None:
        raise _BadRow("missing_key", "missing")
    if isinstance(value, str):
        if not value.strip():
            raise _BadRow("empty_prompt", "empty prompt")
        if not apply_chat_template:
            return value, False
        value = [{"role": "user", "content": value}]
    messages = _messages(value)
    if messages is None:
        raise _BadRow("undecodable", f"input is neither text nor chat messages: {str(value)[:80]!r}")
    if not any(m["content"].strip() for m in messages):
        raise _BadRow("empty_prompt", "empty prompt (every message is empty)")
    if not apply_chat_template:
        raise _BadRow("undecodable", "input is a list of chat messages; pass --apply-chat-template")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("--apply-chat-template: the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True


def _metadata(value: Any) -> dict[str, Any]:
    if value is _MISSING or value is None:
        raise _BadRow("missing_key", "missing")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise _BadRow("undecodable", f"metadata is not JSON ({err})") from None
    if not isinstance(value, dict):
        raise _BadRow("undecodable", f"metadata is a {type(value).__name__}, not a dict")
    return value


@dataclass
class PromptDataset:
    """The usable prompts of a file, in file order, and the count of dropped rows by reason."""

    path: str
    prompts: list[Prompt]
    filtered: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]

    @classmethod
    def load(cls, cfg: PromptDataConfig, tokenizer: Any, split: str = "train") -> "PromptDataset":
        """Read, check and tokenise every row of ``cfg.path`` (see the module docstring for the rules).

        Args:
            cfg: the data flags.
            tokenizer: a transformers tokenizer (its chat template when ``cfg.apply_chat_template``).
            split: the split of a saved DatasetDict.
        """
        cfg.validate()
        skip = cfg.bad_rows == "skip"
        data, undecodable = load_rows(cfg.path, split=split, skip_undecodable=skip)
        filtered: Counter = Counter()
        if undecodable:
            filtered["undecodable"] += undecodable
        columns = set(data.column_names)
        for flag, key in (("--input-key", cfg.input_key), ("--label-key", cfg.label_key),
                          ("--metadata-key", cfg.metadata_key)):
            if key and key.split(".")[0] not in columns:
                raise PromptDataError(f"{cfg.path}: {flag} {key!r} is not a column (columns: {sorted(columns)})")
        rows: list[tuple[int, str, bool, Any, dict]] = []
        for index, row in enumerate(tqdm(data, desc=f"read {Path(cfg.path).name}", disable=len(data) < 10_000)):
            key = cfg.input_key
            try:
                text, rendered = render(get_field(row, key), tokenizer, cfg.apply_chat_template)
                label = None
                if cfg.label_key:
                    key = cfg.label_key
                    label = get_field(row, key)
                    if label is _MISSING or label is None:
                        raise _BadRow("missing_key", "missing")
                metadata = {}
                if cfg.metadata_key:
                    key = cfg.metadata_key
                    metadata = _metadata(get_field(row, key))
            except _BadRow as bad:
                if not skip:
                    raise PromptDataError(f"{cfg.path}: row {index}: {key!r}: {bad} "
                                          "(--prompt-data-bad-rows skip drops such rows)") from None
                filtered[bad.reason] += 1
                continue
            rows.append((index, text, rendered, label, metadata))
        prompts = []
        for (index, text, rendered, label, metadata), ids in zip(rows, _encode(tokenizer, rows)):
            if cfg.max_prompt_len is not None and len(ids) > cfg.max_prompt_len:
                filtered["over_length"] += 1
                continue
            prompts.append(Prompt(index, ids, text, label, metadata))
        if filtered:
            logger.info("%s: %d of %d rows dropped (%s)", cfg.path, sum(filtered.values()),
                        len(data) + undecodable, ", ".join(f"{k}: {v}" for k, v in sorted(filtered.items())))
        if not prompts:
            raise PromptDataError(f"{cfg.path}: no usable prompt ({dict(filtered) or 'the file is empty'})")
        return cls(cfg.path, prompts, filtered)


def _encode(tokenizer: Any, rows: list[tuple[int, str, bool, Any, dict]]) -> list[list[int]]:
    """Token ids of each row's text; rendered chat prompts get no extra special tokens (batched by kind)."""
    ids: list[Optional[list[int]]] = [None] * len(rows)
    for rendered in (False, True):
        picked = [i for i, row in enumerate(rows) if row[2] is rendered]
        if picked:
            encoded = tokenizer([rows[i][1] for i in picked], add_special_tokens=not rendered)["input_ids"]
            for i, seq in zip(picked, encoded):
                ids[i] = [int(t) for t in seq]
    return ids  # type: ignore[return-value]
