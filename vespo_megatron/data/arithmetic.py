"""A small local world for the demo and the tests: a character-level tokenizer with a chat template, built with the
``tokenizers`` library (no hub), and a generated arithmetic prompt set ("What is 17+25?" -> "\\boxed{42}").

Tokenizer: one token per character of ``ALPHABET`` plus the special tokens ``<pad>``, ``<|endoftext|>`` (EOS),
``<|im_start|>``, ``<|im_end|>`` and ``<unk>``; the chat template is ChatML-like and ends the generation prompt with
``<|im_start|>assistant\\n``.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL = ("<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
ALPHABET = string.digits + string.ascii_letters + " +-*/=?.,:{}\\$()\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(path: str | Path) -> Any:
    """Write the character tokenizer (with its chat template) to ``path``; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + tuple(ALPHABET))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(list(SPECIAL))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|endoftext|>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    return tok


def arithmetic_rows(num: int, seed: int, max_operand: int = 50) -> list[dict[str, Any]]:
    """``num`` rows {"prompt": "What is a+b?", "label": "\\boxed{a+b}", "metadata": {"a", "b"}}, seeded."""
    rng = np.random.default_rng(seed)
    rows = []
    for a, b in rng.integers(0, max_operand, (num, 2)).tolist():
        rows.append({"prompt": f"What is {a}+{b}?", "label": f"\\boxed{{{a + b}}}", "metadata": {"a": a, "b": b}})
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
