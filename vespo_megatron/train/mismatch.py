"""Train-inference mismatch of one set of rollouts, with routing replay off and on (R3), side by side.

``measure_mismatch`` takes rollout records generated ONCE with routing capture (prompt ids [P], response ids [N],
rollout log-probs μ [N], routing [P + N − 1, num_hf_layers, k]) and scores the SAME records with the Megatron model
loaded from the same HF checkpoint, through the training path: packer -> ``micro_batch`` -> ``old_log_probs``; once
with live routing and once replaying the rollout's experts (``RoutingReplay(model, "r3")``, traces sharded by
``routing.shard.batch_shard``). Forward hooks on the routers record the experts each forward used. Every metric of
docs/mismatch.md (``metrics.mismatch``) is computed for both passes and reported by ``metrics.report``: a table on
stdout, ``mismatch.json`` and the Δ, logW and per-layer routing plots.

Alignment (sample i, n = P + N tokens). The training pass gives, per sample, log-probs [n − 1] (entry p =
logπ(token p+1 | tokens ≤ p)) and routing [n, num_moe_layers, k] (row p = the router input token p). Response token
j (token P + j) is scored by the forward of token P + j − 1, so it takes entry and row P − 1 + j of both sides: prompt
tokens are not scored and the last token's row (which has no rollout row) is not compared. Rollout routing keeps the
MoE columns of the HF layers (dense layers are zero rows).

The training logits are divided by the sampling temperature (as the engine's log-probs are log_softmax(logits / T)).
The Megatron side runs on lcm(tp, ep) gloo/NCCL ranks (sequence parallel under TP); every data-parallel replica
scores every micro-batch and the first replica's TP ranks give the result.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from vespo_megatron.convert.spec import load_hf_config, model_spec
from vespo_megatron.metrics.mismatch import MismatchSamples, mismatch_metrics, mismatch_samples
from vespo_megatron.metrics.report import write_report
from vespo_megatron.packing import PackedBatch, Sample, pack, plan_micro_batches, restore_order, unpack
from vespo_megatron.rollout.records import RolloutRecord
from vespo_megatron.routing.trace import PackedTrace, TraceSpec
from vespo_megatron.routing.trace import pack as pack_trace

REPLAY_OFF = "replay off"
REPLAY_ON = "replay on (R3)"
TRAIN_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainSide:
    """One training pass, per sample i (n_i = P_i + N_i tokens): ``logprobs[i]`` [n_i − 1] float, entry p =
    logπ_train(token p+1 | tokens ≤ p); ``routing[i]`` [n_i, num_moe_layers, k] int, the experts of token p's
    forward."""

    logprobs: list[np.ndarray]
    routing: list[np.ndarray]


@dataclass(frozen=True)
class Aligned:
    """Response tokens of every sample, in sample order: log-probs [num_tokens], seq_ids [num_tokens] (the sample
    index), experts [num_tokens, num_moe_layers, k] of the forward that scored each token."""

    logp_train: np.ndarray
    logp_rollout: np.ndarray
    seq_ids: np.ndarray
    experts_train: np.ndarray
    experts_rollout: np.ndarray


def trace_spec(hf_config: Any) -> TraceSpec:
    """The routing trace layout of an HF config: its MoE layers (HF indices), experts and top-k."""
    spec = model_spec(hf_config)
    return TraceSpec.from_layer_pattern(spec.moe_layers, spec.num_experts, hf_config.num_experts_per_tok)


def _check_record(i: int, record: RolloutRecord, spec: TraceSpec) -> None:
    """Shapes of one record: μ [N], routing [P + N − 1, num_hf_layers, k] from row 0."""
    where = f"sample {i} (request {record.rid})"
    n_prompt, n_resp = len(record.prompt_ids), len(record.response_ids)
    if n_prompt < 1:
        raise ValueError(f"{where}: empty prompt")
    if record.logprobs.shape != (n_resp,):
        raise ValueError(f"{where}: logprobs of shape {record.logprobs.shape} for {n_resp} response tokens")
    if record.routing is None:
        raise ValueError(f"{where}: no routing; generate with return_routed_experts=True")
    if record.routed_experts_start_len:
        raise ValueError(f"{where}: routing starts at row {record.routed_experts_start_len}; the tool needs every "
                         "row (routed_experts_start_len=0)")
    want = (n_prompt + n_resp - 1, spec.num_hf_layers, spec.topk)
    if record.routing.shape != want:
        raise ValueError(f"{where}: routing of shape {record.routing.shape}, expected {want}")


def align(records: Sequence[RolloutRecord], side: TrainSide, spec: TraceSpec) -> Aligned:
    """Response tokens of both sides, aligned as in the module docstring (errors name the sample and request)."""
    if len(side.logprobs) != len(records) or len(side.routing) != len(records):
        raise ValueError(f"training side has {len(side.logprobs)} log-prob and {len(side.routing)} routing arrays "
                         f"for {len(records)} records")
    parts: list[tuple[np.ndarray, ...]] = []
    for i, record in enumerate(records):
        _check_record(i, record, spec)
        n_prompt, n = len(record.prompt_ids), len(record.prompt_ids) + len(record.response_ids)
        logp, routing = np.asarray(side.logprobs[i]), np.asarray(side.routing[i])
        if logp.shape != (n - 1,):
            raise ValueError(f"sample {i} (request {record.rid}): training log-probs of shape {logp.shape}, expected "
                             f"({n - 1},)")
        if routing.shape != (n, spec.num_moe_layers, spec.topk):
            raise ValueError(f"sample {i} (request {record.rid}): training routing of shape {routing.shape}, expected "
                             f"{(n, spec.num_moe_layers, spec.topk)}")
        rows = slice(n_prompt - 1, n - 1)
        parts.append((logp[rows], record.logprobs, np.full(n - n_prompt, i), routing[rows],
                      record.routing[rows][:, list(spec.moe_layers)]))
    train, rollout, seq, ex_train, ex_rollout = (np.concatenate(column) for column in zip(*parts))
    return Aligned(train.astype(np.float64), rollout.astype(np.float64), seq, ex_train, ex_rollout)


def column_metrics(records: Sequence[RolloutRecord], side: TrainSide,
                   spec: TraceSpec) -> tuple[dict[str, Any], MismatchSamples]:
    """Every mismatch metric of one training pass against the rollout, and the Δ / logW samples for the plots."""
    a = align(records, side, spec)
    metrics = mismatch_metrics(a.logp_train, a.logp_rollout, a.seq_ids, experts_train=a.experts_train,
                               experts_rollout=a.experts_rollout)
    return metrics, mismatch_samples(a.logp_train, a.logp_rollout, a.seq_ids)


def report(records: Sequence[RolloutRecord], sides: dict[str, TrainSide], spec: TraceSpec,
           output_dir: str | Path | None = None, stream: TextIO | None = None) -> dict[str, dict[str, Any]]:
    """Metrics of each named pass (columns); with ``output_dir``, the table on ``stream``, the JSON and the plots."""
    columns, samples = {}, {}
    for name, side in sides.items():
        columns[name], samples[name] = column_metrics(records, side, spec)
    if output_dir is not None:
        write_report(columns, output_dir, samples, stream)
    return columns


def per_sample(batches: Sequence[PackedBatch], slot_values: Sequence[np.ndarray], num_samples: int) -> list[np.ndarray]:
    """Per-slot values of each micro-batch ([t, ...], CP size 1) -> one array [n_i, ...] per sample id, token order."""
    per_batch = [unpack(b, np.ascontiguousarray(v)[None]) for b, v in zip(batches, slot_values, strict=True)]
    return restore_order(batches, per_batch, num_samples)


def training_side(batches: Sequence[PackedBatch], logprobs: Sequence[np.ndarray], routing: Sequence[np.ndarray],
                  num_samples: int) -> TrainSide:
    """A :class:`TrainSide` from per-micro-batch slot log-probs [t] (slot p scores token p+1) and slot routing
    [t, num_moe_layers, k]; the last slot of a sample scores nothing and is dropped."""
    logp = per_sample(batches, logprobs, num_samples)
    return TrainSide([lp[:-1] for lp in logp], per_sample(batches, routing, num_samples))


# ------------------------------------------------------------------------------------------ the Megatron side
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


class _RouterCapture:
    """Forward hooks on the model's MoE routers: the sorted expert ids [T, k] of every call, by trace column."""

    def __init__(self, routers: Sequence[Any], columns: Sequence[int]) -> None:
        self.calls: dict[int, list[np.ndarray]] = {c: [] for c in columns}
        self.handles = [r.register_forward_hook(self._hook(c)) for r, c in zip(routers, columns, strict=True)]

    def _hook(self, column: int):
        def hook(module: Any, inputs: Any, output: Any) -> None:
            routing_map = output[1]  # [T, E] bool, k experts per row
            ids = routing_map.nonzero()[:, 1].view(routing_map.shape[0], module.topk)  # row-major: sorted per row
            self.calls[column].append(ids.cpu().numpy())

        return hook

    def pop(self) -> list[np.ndarray]:
        """[T, num_moe_layers, k] per micro-batch forward since the last pop."""
        columns = sorted(self.calls)
        out = [np.stack(rows, axis=1) for rows in zip(*(self.calls[c] for c in columns), strict=True)]
        self.calls = {c: [] for c in columns}
        return out


def _train_rank(rank: int, job: _Job) -> dict[str, Any]:
    """Score the job's micro-batches on this rank with replay off, then on; slot log-probs [t] and this SP rank's
    routing rows [t/sp, num_moe_layers, k] per micro-batch."""
    import torch

    from vespo_megatron.convert.hf_io import HfCheckpoint
    from vespo_megatron.convert.inmemory import hf_to_mcore_tensors
    from vespo_megatron.convert.parity import build_megatron
    from vespo_megatron.megatron.batch import micro_batch
    from vespo_megatron.megatron.parallel import init_parallel
    from vespo_megatron.megatron.step import old_log_probs
    from vespo_megatron.megatron.weights import load_global
    from vespo_megatron.routing.replay import RoutingReplay, find_routers
    from vespo_megatron.routing.shard import batch_shard

    init_parallel(tp=job.tp, ep=job.ep, etp=None if job.ep == 1 else 1)
    hf = load_hf_config(job.hf_dir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job.train_dtype]
    model = build_megatron(hf, dtype=dtype, routing_replay=True).eval()
    with HfCheckpoint(job.hf_dir).session() as session:
        load_global(model, dict(hf_to_mcore_tensors(model_spec(hf, tp=job.tp), session.get)))
    if job.temperature != 1.0:
        model.output_layer.register_forward_hook(lambda m, i, out: (out[0] / job.temperature, *out[1:]))
    sp_rank = rank % job.tp  # Megatron's default rank order "tp-cp-ep-dp-pp": TP ranks are consecutive
    mbs = [micro_batch(batch, 0, sp_rank) for batch in job.batches]
    replay = RoutingReplay(model, "r3")
    capture = _RouterCapture(find_routers(model), replay.layer_columns)
    shards = [batch_shard(job.trace, batch, 0, sp_rank, replay.layer_columns) for batch in job.batches]

    def as_numpy(logps: list) -> list[np.ndarray]:
        return [lp.to(torch.float64).numpy() for lp in logps]

    out: dict[str, Any] = {"dp_rank": rank // job.tp, "sp_rank": sp_rank}
    out["off"] = (as_numpy(old_log_probs(model, mbs)), capture.pop())
    with replay.phase("old_logprob", shards):
        out["on"] = (as_numpy(old_log_probs(model, mbs)), capture.pop())
    replay.remove()
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
    stream: TextIO | None = None,
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
    hf = load_hf_config(hf_dir)
    spec = trace_spec(hf)
    for i, record in enumerate(records):
        _check_record(i, record, spec)
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
    return report(records, sides, spec, output_dir, stream)


# ------------------------------------------------------------------------------------------ rollouts and prompts
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
    from vespo_megatron.rollout.sglang import SGLangClient, SGLangEngineClient

    if sglang_url:
        return SGLangClient(sglang_url, routing=spec)
    from vespo_megatron.rollout.hf_engine import HFEngine

    return SGLangEngineClient(HFEngine.from_pretrained(str(hf_dir), dtype=engine_dtype, seed=seed), routing=spec)
