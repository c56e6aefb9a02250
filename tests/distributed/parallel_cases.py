"""Rank functions for the parallel-exactness tests (module level, so ``spawn`` can import them)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from vespo_megatron.megatron.batch import MicroBatch, micro_batch
from vespo_megatron.megatron.loss import REGULARIZER_METRICS, LossSettings
from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.megatron.model import build_model
from vespo_megatron.megatron.parallel import init_parallel
from vespo_megatron.megatron.step import forward_backward, old_log_probs, wrap_ddp, zero_grads
from vespo_megatron.megatron.weights import export_global, load_global
from vespo_megatron.packing.reference import pack, unpack
from vespo_megatron.packing.sample import Sample
from vespo_megatron.train.reference import Reference


def make_samples(n: int, seed: int = 0, vocab: int = 256,
                 lengths: Optional[Sequence[tuple[int, int]]] = None) -> list[Sample]:
    """n samples with prompts of 2-6 and responses of 1-9 tokens (or the (prompt, response) ``lengths``), rollout
    log-probs and ±advantages."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(2, 7)), int(rng.integers(1, 10))
        if lengths is not None:
            p, r = lengths[i]
        out.append(Sample(
            prompt=rng.integers(0, vocab, p).astype(np.int64),
            response=rng.integers(0, vocab, r).astype(np.int64),
            rollout_logprobs=-rng.uniform(3.0, 7.0, r).astype(np.float32),
            advantage=float(rng.choice([-1.0, 0.5, 1.5])) * (1 + i % 3),
        ))
    return out


def initial_weights(hf, dtype: torch.dtype, seed: int = 7) -> dict[str, torch.Tensor]:
    """Global weights of a 1-rank build of ``hf`` (a config or a tiny family name; call inside a 1-rank world)."""
    torch.manual_seed(seed)
    model = build_model(tiny_hf_config(hf) if isinstance(hf, str) else hf, dtype=dtype)
    weights = export_global(model)
    for key, value in weights.items():  # the DSV3-style expert bias is zero at init: give it a routing effect
        if key.endswith("expert_bias"):
            value.copy_(torch.linspace(-0.3, 0.3, value.numel(), dtype=value.dtype).reshape(value.shape))
    return weights


def weights_rank(rank: int, family: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rank function (``spawn(weights_rank, 1, family, dtype)``): the 1-rank global weights of ``family``."""
    init_parallel()
    return initial_weights(family, dtype)


def micro_batches(samples: list[Sample], n_micro: int, sp: int, sp_rank: int, dp: int, dp_rank: int,
                  cp: int = 1, cp_rank: int = 0) -> list[MicroBatch]:
    """Round-robin split into n_micro micro-batches; DP rank d takes every dp-th; packed for (cp, sp), the slots of
    CP rank ``cp_rank``; global normalisers attached; ``extra``: the micro-batch's ``sample_ids``, its ``packed``
    batch and the ``cp_rank``."""
    groups = [list(range(len(samples)))[i::n_micro] for i in range(n_micro)]
    tokens = float(sum(len(s.response) for s in samples))
    out = []
    for gi, ids in enumerate(groups):
        if gi % dp != dp_rank:
            continue
        packed = pack([samples[i] for i in ids], cp=cp, sp=sp, sample_ids=ids)
        mb = micro_batch(packed, cp_rank, sp_rank)
        mb.global_tokens, mb.global_seqs = tokens, float(len(samples))
        mb.extra.update(sample_ids=ids, packed=packed, cp_rank=cp_rank)
        out.append(mb)
    return out


def per_sample_logp(mbs: list[MicroBatch], logps: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """sample id -> log-probs of its response tokens: each micro-batch's slots [t] gathered over the CP group into
    [cp, t] and unsharded by the packer's inverse (slot p holds the log-prob of token p + 1 of its sequence)."""
    group = parallel_state.get_context_parallel_group()
    out = {}
    for mb, lp in zip(mbs, logps):
        packed = mb.extra["packed"]
        every = [lp]
        if packed.cp > 1:
            every = [torch.empty_like(lp) for _ in range(packed.cp)]
            dist.all_gather(every, lp.contiguous(), group=group)
        per_seq = unpack(packed, torch.stack(every).numpy())
        for local, sid in enumerate(mb.extra["sample_ids"]):
            start, end = int(packed.prompt_lens[local]) - 1, int(packed.seq_lens[local]) - 1
            out[sid] = torch.from_numpy(per_seq[local][start:end].copy())
    return out


def run_layout(rank: int, layout: dict, family: str, dtype: torch.dtype, weights: dict, samples: list[Sample],
               n_micros: tuple[int, ...], loss: str = "vespo", ref_weights: Optional[dict] = None,
               settings: Optional[dict] = None) -> list[dict]:
    """Build the model under ``layout``, load ``weights``, run the old-log-prob pass and one forward-backward per
    micro-batch count; returns per count: loss share (each CP rank reports its share), per-sample log-probs (whole
    sequences, unsharded over CP), global grads (rank 0). ``ref_weights``: a frozen reference model (same layout)
    whose log-probs are attached next to the old-log-prob pass; ``settings``: more LossSettings fields (kl_coef,
    entropy_coef, ...)."""
    init_parallel(**layout)
    model = build_model(tiny_hf_config(family), dtype=dtype)
    load_global(model, weights)
    reference = None
    if ref_weights is not None:
        ref_model = build_model(tiny_hf_config(family), dtype=dtype)
        load_global(ref_model, ref_weights)
        reference = Reference(ref_model.requires_grad_(False), routing_replay="off")
    ddp = wrap_ddp(model)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    sp = parallel_state.get_tensor_model_parallel_world_size()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    cp, cp_rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    last = parallel_state.is_pipeline_last_stage()
    results = []
    for n_micro in n_micros:
        zero_grads(ddp)
        mbs = micro_batches(samples, n_micro, sp, tp_rank, dp, dp_rank, cp, cp_rank)
        olds = old_log_probs(ddp, mbs)
        if last:
            mbs = [mb.with_old_log_prob(o) for mb, o in zip(mbs, olds)]
        if reference is not None:
            reference.attach(mbs)
        metrics = forward_backward(ddp, mbs, LossSettings(name=loss, old_from_rollout=True, **(settings or {})))
        results.append({
            "report": last and tp_rank == 0,
            "loss": float(sum(m["loss"] for m in metrics)) if last else None,
            **{key: float(sum(m[key] for m in metrics)) if last else None for key in REGULARIZER_METRICS
               if metrics and key in metrics[0]},
            "logp": per_sample_logp(mbs, olds) if last else None,
            "grads": export_global(model, grads=True),
        })
    return results
