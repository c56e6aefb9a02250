"""Prompt datasets: files read with ``datasets`` (source), rows checked and tokenised (prompts), the resumable
drawing order (order) and the run's tokenizer and stop ids (tokenizer)."""
from vespo_megatron.data.order import PromptOrder
from vespo_megatron.data.prompts import BAD_ROWS, Prompt, PromptDataConfig, PromptDataset
from vespo_megatron.data.source import PromptDataError, load_rows
from vespo_megatron.data.tokenizer import eos_token_ids, load_tokenizer

__all__ = ["BAD_ROWS", "Prompt", "PromptDataConfig", "PromptDataError", "PromptDataset", "PromptOrder",
           "eos_token_ids", "load_rows", "load_tokenizer"]
