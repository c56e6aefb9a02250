"""Scoring of rollouts on Megatron ranks, with routing replay off and on (R3), and the tool's entry point.

``measure_mismatch`` takes rollout records generated ONCE with routing capture (prompt ids [P], response ids [N],
rollout log-probs μ [N], routing [P + N − 1, num_hf_layers, k]) and scores the SAME records with the Megatron model
loaded from the same HF checkpoint, through the training path: packer -> ``micro_batch`` -> ``old_log_probs``; once
with live routing and once replaying the rollout's experts (``RoutingReplay(model, "r3")``, traces sharded by
``routing.shard.batch_shard``). :class:`~vespo_megatron.routing.capture.RouterCapture` records the experts each
forward used. Log-probs are those of logits / τ (the sampling temperature), computed where the trainer computes
them (``old_log_probs(..., temperature=τ)``).

The Megatron side runs on lcm(tp, ep) gloo/NCCL ranks (sequence parallel under TP); every data-parallel replica
scores every micro-batch and the first replica's TP ranks (``parallel.ranks()``) give the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vespo_megatron.hf_config import load_hf_config
from vespo_megatron.mismatch.align import check_record, trace_spec, training_side
from vespo_megatron.mismatch.report import report
from vespo_megatron.packing import PackedBatch, Sample, pack, plan_micro_batches
from vespo_megatron.rollout.records import RolloutRecord
from vespo_megatron.routing.trace import PackedTrace
from vespo_megatron.routing.trace import pack as pack_trace

REPLAY_OFF = "replay off"
REPLAY_ON = "replay on (R3)"
TRAIN_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class _Job:
    hf_dir: str
    batches: list[PackedBatch]  # packed with sp = tp
    trace: PackedTrace  # the rollout's MoE routing, by sample id
    train_dtype: str
    tp: int
    ep: int
    temperature: float


def _world_size(tp: int, ep: int) -> int:
    return tp * ep // math.gcd(tp, ep)


def _train_rank(rank: int, job: _Job) -> dict[str, Any]:
    """Score the job's micro-batches on this rank with replay off, then on; slot log-probs [t] and this SP rank's
    routing rows [t/sp, num_moe_layers, k] per micro-batch."""
    import torch

    from vespo_megatron.convert.hf_io import HfCheckpoint
    from vespo_megatron.convert.inmemory import hf_to_mcore_tensors
    from vespo_megatron.convert.parity import build_megatron
    from vespo_megatron.convert.spec import model_spec
    from vespo_megatron.megatron.batch import micro_batch
    from vespo_megatron.megatron.parallel import init_parallel, ranks
    from vespo_megatron.megatron.step import old_log_probs
    from vespo_megatron.megatron.weights import load_global
    from vespo_megatron.routing.capture import RouterCapture
    from vespo_megatron.routing.replay import RoutingReplay, find_routers
    from vespo_megatron.routing.shard import batch_shard

    init_parallel(tp=job.tp, ep=job.ep, etp=None if job.ep == 1 else 1)
    hf = load_hf_config(job.hf_dir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job.train_dtype]
    model = build_megatron(hf, dtype=dtype, routing_replay=True).eval()
    with HfCheckpoint(job.hf_dir).session() as session:
        load_global(model, dict(hf_to_mcore_tensors(model_spec(hf, tp=job.tp), session.get)))
    place = ranks()
    mbs = [micro_batch(batch, 0, place.tp_rank) for batch in job.batches]
    replay = RoutingReplay(model, "r3")
    capture = RouterCapture(find_routers(model), replay.layer_columns)
    shards = [batch_shard(job.trace, batch, 0, place.tp_rank, replay.layer_columns) for batch in job.batches]

    def score() -> tuple[list[np.ndarray], list[np.ndarray]]:
        logps = old_log_probs(model, mbs, temperature=job.temperature)
        return [lp.to(torch.float64).numpy() for lp in logps], [ids.numpy() for ids in capture.pop_stacked()]

    out: dict[str, Any] = {"dp_rank": place.dp_rank, "sp_rank": place.tp_rank, "off": score()}
    with replay.phase("old_logprob", shards):
        out["on"] = score()
    replay.remove()
    capture.remove()
    return out


def _run_ranks(job: _Job, in_process: bool | None) -> list[dict[str, Any]]:
    """Results of every rank; 1-rank jobs run in this process unless ``in_process`` is False."""
    world = _world_size(job.tp, job.ep)
    if in_process is None:
        import torch.distributed as dist

        in_process = world == 1 and not (dist.is_initialized() and dist.get_world_size() > 1)
    if in_process:
        if world != 1:
            raise ValueError(f"in_process needs a 1-rank layout, got tp={job.tp}, ep={job.ep}")
        return [_train_rank(0, job)]
    from vespo_megatron.megatron.parallel import spawn

    return spawn(_train_rank, world, job)


def measure_mismatch(
    hf_dir: str | Path,
    records: Sequence[RolloutRecord],
    *,
    train_dtype: str = "fp32",
    tensor_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    temperature: float = 1.0,
    micro_batch_size: int = 8,
    output_dir: str | Path | None = None,
    in_process: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Mismatch metrics of ``records`` (generated with routing, sampling ``temperature``) against the Megatron model
    of ``hf_dir``: {REPLAY_OFF: metrics, REPLAY_ON: metrics}; with ``output_dir`` also the table, JSON and plots."""
    if train_dtype not in TRAIN_DTYPES:
        raise ValueError(f"train_dtype: one of {TRAIN_DTYPES}, got {train_dtype!r}")
    for name, value in (("tensor_model_parallel_size", tensor_model_parallel_size),
                        ("expert_model_parallel_size", expert_model_parallel_size),
                        ("micro_batch_size", micro_batch_size)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if not records:
        raise ValueError("records: no rollout to measure")
    spec = trace_spec(load_hf_config(hf_dir))
    for i, record in enumerate(records):
        check_record(i, record, spec)
    tp = tensor_model_parallel_size
    samples = [Sample(prompt=np.asarray(r.prompt_ids, np.int64), response=np.asarray(r.response_ids, np.int64))
               for r in records]
    plan = plan_micro_batches([len(s.prompt) + len(s.response) for s in samples], micro_batch_size=micro_batch_size)
    batches = [pack([samples[i] for i in ids], sp=tp, sample_ids=ids) for ids in plan.micro_batches[0]]
    trace = pack_trace([np.ascontiguousarray(r.routing[:, list(spec.moe_layers)]) for r in records], spec,
                       sample_ids=[r.rid for r in records])
    job = _Job(str(hf_dir), batches, trace, train_dtype, tp, expert_model_parallel_size, float(temperature))
    results = sorted((r for r in _run_ranks(job, in_process) if r["dp_rank"] == 0), key=lambda r: r["sp_rank"])
    sides = {}
    for name, key in ((REPLAY_OFF, "off"), (REPLAY_ON, "on")):
        logprobs = results[0][key][0]
        routing = [np.concatenate(rows) for rows in zip(*(r[key][1] for r in results), strict=True)]
        sides[name] = training_side(batches, logprobs, routing, len(records))
    return report(records, sides, spec, output_dir)
