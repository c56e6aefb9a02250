"""In-memory conversion for weight sync and tests, on the same rules as the file converters.

Megatron side: *global* tensors keyed by dist-checkpoint key (what ``vespo_megatron.megatron.weights.export_global``
returns and ``load_global`` takes): e.g. ``decoder.layers.3.mlp.experts.experts.linear_fc1.weight`` [E, 2·Fe, H].
HF side: checkpoint names as ``save_pretrained`` writes them (per-expert tensors; Mixtral's legacy
``block_sparse_moe`` names), which is what SGLang's ``load_weights`` and ``vespo_megatron.rollout.weight_sync``
consume (the latter maps them onto the CPU engine's fused expert tensors).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import torch

from vespo_megatron.convert import mapping
from vespo_megatron.convert.spec import ModelSpec


def hf_to_mcore_tensors(spec: ModelSpec, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, global tensor) for every Megatron key, built from HF tensors fetched by ``get(hf_name)``.

    Keys with leading (layer/expert) axes are assembled into one tensor [axes…, shape…] per key.
    """
    for key, group in mapping.rules_by_key(spec).items():
        first = group[0]
        parts = [mapping.to_mcore(spec, rule, [get(name) for name in rule.hf]) for rule in group]
        if not first.axes:
            yield key, parts[0]
            continue
        full = parts[0].new_empty(first.global_shape)
        for rule, part in zip(group, parts):
            full[rule.index] = part
        yield key, full


def mcore_to_hf_tensors(spec: ModelSpec, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                        emit_tied_lm_head: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs from Megatron global tensors, in the order given; vocabulary padding stripped.

    Each key may come on its own (streaming weight sync: gather one key, convert, send, free). Keys unknown to the
    model raise KeyError.
    """
    by_key = mapping.rules_by_key(spec)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for key, tensor in items:
        if key not in by_key:
            raise KeyError(f"{key!r} is not a Megatron key of this {spec.family} model")
        for rule in by_key[key]:
            yield from mapping.to_hf(spec, rule, tensor[rule.index] if rule.index else tensor, emit_tied_lm_head)

