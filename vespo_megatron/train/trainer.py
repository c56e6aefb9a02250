"""The RL loop on every rank: rollouts -> rewards -> advantages -> packer -> old log-probs -> N updates -> sync -> eval.

Rank 0 talks to the rollout engines (SGLang servers, or our CPU engine behind the same protocol), plans the step and
sends every rank only its own share (delivery.py: its data-parallel samples, its CP/SP slice of its stage's routing
trace); every rank packs its share for the context-parallel size (every sequence padded to a multiple of 2·cp) and
takes the label-aligned micro-batches of its CP rank (its zig-zag chunks) and TP/SP rank. The global batch is split
into N = ``num_mini_batches`` mini-batches, each one
optimizer step normalised by its own response-token count (exact global token-mean). Routing replay: ``r2``
records π_old's experts in the old-log-prob pass and replays them in the updates; ``r3`` replays the engine's.
After the N updates the Megatron weights go to every engine (converter's in-memory Megatron -> HF path; by default
broadcast in buckets over a process group the engines joined) and the engines' weight version is checked; before
each step an engine that does not hold the current version (restarted, or left paused by an interrupted sync) is
found and the weights are pushed again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from vespo_megatron.convert.inmemory import hf_to_mcore_tensors, mcore_to_hf_tensors
from vespo_megatron.convert.spec import model_spec
from vespo_megatron.hf_config import load_hf_config, num_experts
from vespo_megatron.megatron.batch import MicroBatch
from vespo_megatron.megatron.checkpointing import load_model
from vespo_megatron.megatron.device import local_device
from vespo_megatron.megatron.loss import REGULARIZER_METRICS, LossSettings
from vespo_megatron.megatron.model import build_model, moe_layer_pattern
from vespo_megatron.megatron.parallel import init_parallel, ranks
from vespo_megatron.megatron.schedule import current_lr, lr_scheduler
from vespo_megatron.megatron.step import (build_optimizer, forward_backward, logprob_mismatch, old_log_probs,
                                          wrap_ddp, zero_grads)
from vespo_megatron.megatron.weights import iter_global, load_global
from vespo_megatron.objectives.advantages import compute_advantages
from vespo_megatron.objectives.config import PolicyLossConfig
from vespo_megatron.routing.replay import RoutingReplay
from vespo_megatron.routing.trace import TraceSpec
from vespo_megatron.train import checkpoint
from vespo_megatron.train.config import TrainConfig
from vespo_megatron.train.delivery import BatchDelivery, MiniShare, RankPlace, build_micro_batches, plan_shares
from vespo_megatron.train.inputs import RunInputs, build_inputs
from vespo_megatron.train.reference import Reference
from vespo_megatron.train.rollouts import AsyncRollouts, RolloutBatch, SyncRollouts, make_producer
from vespo_megatron.train.timing import StepTimer


EVAL_SEED_OFFSET = 7_919  # evaluation samples with seeds apart from the training rollouts


logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    iteration: int
    metrics: dict[str, float]


def _hf_tensors_getter(hf_dir: str):
    """get(name) over the safetensors files of an HF directory (opened lazily, one handle per file)."""
    root = Path(hf_dir)
    index = root / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    handles: dict[str, Any] = {}

    def get(name: str) -> torch.Tensor:
        file = files[name] if files else "model.safetensors"
        if file not in handles:
            handles[file] = safe_open(str(root / file), framework="pt")
        return handles[file].get_tensor(name)

    return get


class Trainer:
    """One rank's share of the RL run described by ``cfg`` (call inside a process of the training world)."""

    def __init__(self, cfg: TrainConfig, mcore_checkpoint: Optional[str] = None) -> None:
        self.cfg = cfg.validate()
        init_parallel(tp=cfg.tensor_model_parallel_size, pp=cfg.pipeline_model_parallel_size,
                      ep=cfg.expert_model_parallel_size, cp=cfg.context_parallel_size,
                      etp=cfg.expert_tensor_parallel_size, seed=cfg.seed)
        self.hf = load_hf_config(cfg.hf_checkpoint)
        self.spec = model_spec(self.hf)
        # --bf16: bf16 params in Megatron's Float16Module, fp32 main params in its optimizer (step.build_optimizer)
        self.model = build_model(self.hf, dtype=torch.bfloat16 if cfg.bf16 else torch.float32, **cfg.model_options())
        if mcore_checkpoint:
            load_model(self.model, mcore_checkpoint, what="--mcore-checkpoint")
        else:
            load_global(self.model, dict(hf_to_mcore_tensors(self.spec, _hf_tensors_getter(cfg.hf_checkpoint))))
        self.reference = (Reference.build(self.hf, self.model, ref_load=cfg.ref_load, routing_replay=cfg.routing_replay,
                                          model_options=cfg.model_options()) if cfg.kl_coef else None)
        self.ddp = wrap_ddp(self.model, use_distributed_optimizer=cfg.use_distributed_optimizer)
        self.optimizer = build_optimizer(self.ddp, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                                         adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, clip_grad=cfg.clip_grad)
        self.replay = RoutingReplay(self.model, cfg.routing_replay) if cfg.routing_replay != "off" else None
        self.settings = LossSettings(name=cfg.loss, agg_mode=cfg.loss_agg_mode,
                                     exact_global=not cfg.official_aggregation,
                                     old_from_rollout=cfg.async_rollout or cfg.use_rollout_logprobs,
                                     honour_agg_mode=cfg.honour_agg_mode, temperature=cfg.temperature,
                                     hparams=PolicyLossConfig.from_hparams(**cfg.hparams), kl_coef=cfg.kl_coef,
                                     kl_loss_type=cfg.kl_loss_type, entropy_coef=cfg.entropy_coef)
        pattern = moe_layer_pattern(self.hf)
        self.trace_spec = TraceSpec.from_layer_pattern(pattern, num_experts(self.hf), self.hf.num_experts_per_tok)
        self.iteration, self.version = 0, 0
        self.data_state: Optional[dict] = None
        if cfg.load:
            meta = checkpoint.load(cfg.load, self.model, self.optimizer, self.hf)
            self.iteration, self.version = meta["iteration"], meta["version"]
            self.data_state = meta.get("data")
        # Megatron-Core's scheduler, at the optimizer steps already taken (N per completed RL step)
        self.scheduler = lr_scheduler(self.optimizer, lr=cfg.lr, min_lr=cfg.min_lr, decay_style=cfg.lr_decay_style,
                                      warmup_iters=cfg.lr_warmup_iters,
                                      decay_iters=cfg.lr_decay_iters or cfg.total_optimizer_steps,
                                      weight_decay=cfg.weight_decay, start=self.version * cfg.num_mini_batches)
        self.rank = dist.get_rank()
        r = ranks()
        columns = tuple(self.replay.layer_columns) if self.replay is not None else ()
        self.delivery = BatchDelivery(RankPlace(r.dp_rank, r.tp_rank, columns, r.cp_rank), self.hf.num_experts_per_tok)
        self.inputs: Optional[RunInputs] = None
        self.client = self.source = self.sync = None
        # one staging directory for every rank (the disk sync writes shards from each owning rank)
        box = [tempfile.mkdtemp(prefix="vespo-weights-") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        self._staging = box[0]
        if self.rank == 0:
            from vespo_megatron.rollout.engines import EnginePool

            self.client = EnginePool(cfg.sglang_url, routing=self.trace_spec)
            self.client.wait_until_healthy(timeout_s=120)
            self.sync = self._weight_sync()
        self.sync_weights()  # the engine starts from the (possibly resumed) training weights
        if self.rank == 0:
            self.inputs = inputs = build_inputs(cfg, self.hf.vocab_size)
            if self.data_state is not None:  # continue with the next unseen prompt
                inputs.prompts.load_state_dict(self.data_state)
            produce = make_producer(self.client, inputs.prompts, inputs.reward,
                                    rollout_batch_size=cfg.rollout_batch_size, n=cfg.n_samples_per_prompt,
                                    sampling=inputs.sampling_params(), seed=cfg.seed,
                                    routing=cfg.routing_replay == "r3", tokenizer=inputs.tokenizer,
                                    reward_errors=cfg.reward_errors, dynamic_sampling=cfg.dynamic_sampling,
                                    max_rounds=cfg.dynamic_sampling_max_rounds if cfg.dynamic_sampling else 1)
            self.source = (AsyncRollouts(produce, self.iteration, cfg.max_lag, lambda: self.version)
                           if cfg.async_rollout else SyncRollouts(produce))

    # ------------------------------------------------------------------------------------------------ one step
    def _shares(self, batch: RolloutBatch) -> list[list[MiniShare]]:
        """Rank 0: every rank's share of the step (index = rank), advantages computed once here."""
        cfg, r = self.cfg, ranks()
        lengths = torch.tensor([len(rec.response_ids) for rec in batch.records], dtype=torch.float64)
        advantages = compute_advantages(cfg.advantage_estimator, torch.tensor(batch.rewards), batch.group_ids,
                                        lengths).numpy()
        samples = batch.samples(advantages)
        trace = batch.routing_trace(self.trace_spec) if cfg.routing_replay == "r3" else None
        max_tokens = cfg.max_tokens_per_gpu if cfg.use_dynamic_batch_size else None
        try:
            return [plan_shares(samples, trace, cfg.num_mini_batches, r.dp, r.tp, cfg.micro_batch_size, place,
                                cp=r.cp, max_tokens=max_tokens) for place in self.delivery.places]
        except ValueError as err:
            if max_tokens is None:
                raise
            raise RuntimeError(f"iteration {self.iteration}: --max-tokens-per-gpu {max_tokens}: {err}") from err

    def _mini_batches(self, minis: list[MiniShare]) -> list[list[MicroBatch]]:
        """This rank's share -> its micro-batches of each mini-batch (packed here, routing slice attached)."""
        r = ranks()
        columns = self.replay.layer_columns if self.replay is not None else ()
        return [build_micro_batches(mini, r.cp, r.cp_rank, r.tp, r.tp_rank, columns, self.trace_spec.num_experts)
                for mini in minis]

    def step(self) -> StepResult:
        """One RL step; every stage timed on rank 0 (train/timing.py)."""
        cfg, it = self.cfg, self.iteration
        timer = StepTimer()
        with timer.stage("step"):
            self.ensure_engines()
            with timer.stage("rollout"):
                batch = self.source.get(it, self.version) if self.rank == 0 else None
            if batch is not None:  # scored in the producer (sync: inside the wait, so moved out of "rollout")
                timer.add("rollout", 0.0 if cfg.async_rollout else -batch.reward_seconds)
                timer.add("reward", batch.reward_seconds)
            with timer.stage("pack"):
                minis = self._mini_batches(self.delivery.scatter(self._shares(batch) if self.rank == 0 else None))
            flat = [mb for mbs in minis for mb in mbs]
            mismatch: dict[str, float] = {}
            if not self.settings.old_from_rollout or cfg.routing_replay == "r2":
                with timer.stage("old_logp"), self._phase("old_logprob", flat):
                    olds = old_log_probs(self.ddp, flat, temperature=cfg.temperature)
                for mb, old in zip(flat, olds):
                    mb.old_log_prob = old
                mismatch = logprob_mismatch(flat)
            if self.reference is not None:  # log π_ref next to π_old, with the routing of that pass
                with timer.stage("old_logp"):
                    self.reference.attach(flat, temperature=cfg.temperature)
            with timer.stage("update"):
                metrics, grad_norms, lr = self._update(minis)
            self.version += 1
            self.iteration += 1
            if batch is not None:  # rank 0 holds the batch and the prompt order
                self.data_state = batch.data_state
            with timer.stage("weight_sync"):
                self.sync_weights()
        out = self._reduce_metrics(batch, metrics, grad_norms)
        out["lr"] = lr
        out.update(mismatch)
        if batch is not None:
            out.update(timer.metrics(tokens=sum(len(r.prompt_ids) + len(r.response_ids) for r in batch.records),
                                     samples=len(batch.records)))
        if self.rank == 0 and cfg.eval_interval and self.iteration % cfg.eval_interval == 0 and self.inputs.eval_sets:
            out.update(self.evaluate())
        return StepResult(it, out)

    def _update(self, minis: list[list[MicroBatch]]) -> tuple[list[dict], list[float], float]:
        """The N optimizer steps of a step (one per mini-batch), the lr schedule stepping after each (Megatron-LM's
        order: step k uses the lr of k steps taken). Returns the micro-batch metrics, the grad norms and the last lr."""
        metrics: list[dict] = []
        grad_norms, lr, offset = [], current_lr(self.optimizer), 0
        for mbs in minis:
            zero_grads(self.ddp)
            lr = current_lr(self.optimizer)
            with self._phase("update", mbs, offset):
                metrics += forward_backward(self.ddp, mbs, self.settings)
            ok, grad_norm, _ = self.optimizer.step()
            if not ok:
                raise RuntimeError(f"iteration {self.iteration}: optimizer step failed (non-finite gradients)")
            self.scheduler.step(1)
            grad_norms.append(float(grad_norm))
            offset += len(mbs)
        return metrics, grad_norms, lr

    def evaluate(self) -> dict[str, float]:
        """Every eval set against the engine, which holds the weights of the current version (rank 0)."""
        from vespo_megatron.evaluation import evaluate

        cfg, inputs = self.cfg, self.inputs
        return evaluate(self.client, inputs.eval_sets, inputs.reward, inputs.sampling_params(greedy=cfg.eval_greedy),
                        cfg.n_samples_per_eval_prompt, tokenizer=inputs.tokenizer, seed=cfg.seed + EVAL_SEED_OFFSET,
                        reward_errors=cfg.reward_errors, tag=str(self.iteration))

    def _phase(self, name: str, mbs: list[MicroBatch], offset: int = 0):
        if self.replay is None:
            return contextlib.nullcontext()
        if self.cfg.routing_replay == "r3":
            return self.replay.phase(name, [mb.routing for mb in mbs])
        # r2: the old-log-prob pass recorded every micro-batch of the step; update k replays from its offset
        return self.replay.phase(name, None, first_micro=offset) if name == "update" else self.replay.phase(name)

    def _reduce_metrics(self, batch: Optional[RolloutBatch], metrics: list[dict],
                        grad_norms: list[float]) -> dict[str, float]:
        """Step metrics: loss and entropy summed over every micro-batch and rank (CP ranks hold disjoint token
        shares); the objective's metrics reduced by kind (``*_min``: min, ``*_max``: max, counts: sum, others: mean
        over micro-batches). Sequence counts are complete on every CP rank (the per-sequence sums are all-reduced over
        CP), so their sum is divided by cp. The batch's own figures (reward, response length, policy lag) on rank 0,
        which holds the batch."""
        r = ranks()
        report = r.last_stage and r.tp_rank == 0
        mine = [{k: float(v) for k, v in m.items()} for m in metrics] if report else []
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        rows = [m for rank_rows in gathered for m in rank_rows]
        tokens = sum(m["response_tokens"] for m in rows)
        out = {
            "loss": sum(m["loss"] for m in rows) / self.cfg.num_mini_batches,
            **{key: sum(m[key] for m in rows) / self.cfg.num_mini_batches for key in REGULARIZER_METRICS
               if rows and key in rows[0]},
            "entropy": sum(m["entropy_sum"] for m in rows) / max(tokens, 1.0),
            "grad_norm": float(np.mean(grad_norms)),
        }
        if batch is not None:
            out.update(reward_mean=float(np.mean(batch.rewards)),
                       response_len_mean=float(np.mean([len(r.response_ids) for r in batch.records])),
                       policy_lag=float(self.version - 1 - batch.version), **batch.metrics)
        for key in (rows[0] if rows else {}):
            if key in ("loss", "entropy_sum", "response_tokens", *REGULARIZER_METRICS):
                continue
            values = [m[key] for m in rows]
            if key.endswith("_min"):
                out[key] = min(values)
            elif key.endswith("_max"):
                out[key] = max(values)
            elif "count" in key or "/n_" in key:
                out[key] = sum(values) / r.cp
            else:
                out[key] = float(np.mean(values))
        if self.replay is not None:
            out.update(self.replay.health.pop(dist.group.WORLD))
        return out

    # ----------------------------------------------------------------------------------------- weights, saving
    def _weight_sync(self) -> Any:
        """Rank 0: the DistributedSync of ``--weight-sync distributed`` (``auto``: when every engine serves it)."""
        from vespo_megatron.rollout.weight_sync import DistributedSync, master_address

        cfg = self.cfg
        mode = cfg.weight_sync
        if mode == "auto":
            mode = "distributed" if all(self.client.on_all(lambda c: c.serves_distributed_update(),
                                                           "route check")) else "disk"
        self.weight_sync_mode = mode
        if mode != "distributed":
            return None
        address = cfg.weight_sync_master_addr or master_address([c.base_url for c in self.client.clients])
        return DistributedSync(self.client, address, backend="nccl" if torch.cuda.is_available() else "gloo",
                               bucket_bytes=cfg.weight_sync_bucket_mb << 20)

    def sync_weights(self, repush: bool = False) -> None:
        """Megatron -> HF names -> every engine, then check the engines' weight version.

        The global tensors stream one key at a time to rank 0 (``iter_global``), which converts and sends them
        (distributed: in buckets, so rank 0 holds one bucket + one tensor). ``repush``: rebuild the weight-update
        group first (an engine restarted)."""
        from vespo_megatron.rollout.weight_sync import push_weights, verify_weights

        mode = [getattr(self, "weight_sync_mode", None)]
        dist.broadcast_object_list(mode, src=0)
        if mode[0] == "disk":
            return self._sync_disk(repush)
        stream = iter_global(self.model)
        if self.rank != 0:
            for _ in stream:  # every rank takes part in each key's gather
                pass
            return
        version = f"v{self.version}"
        if repush and self.sync is not None:
            self.sync.reset()
        push_weights(self.client, mcore_to_hf_tensors(self.spec, stream), version, via=self.weight_sync_mode,
                     hf_config=self.hf, staging_dir=self._staging, sync=self.sync,
                     shard_bytes=self.cfg.weight_sync_bucket_mb << 20)
        verify_weights(self.client, version=version)

    def _sync_disk(self, repush: bool) -> None:
        """Every rank assembles every world_size-th key, converts it and writes its own safetensors shards; rank 0
        writes config + index over all ranks' shards and asks the engines to load the directory."""
        from vespo_megatron.rollout.weight_sync import verify_weights, write_index, write_shards

        world = dist.get_world_size()
        mine = ((key, tensor) for key, tensor in iter_global(self.model, owner=lambda i: i % world)
                if tensor is not None)
        weight_map = write_shards(mcore_to_hf_tensors(self.spec, mine), self._staging, f"model-rank{self.rank:05d}",
                                  self.cfg.weight_sync_bucket_mb << 20)
        maps: list = [None] * world
        dist.all_gather_object(maps, weight_map)
        if self.rank != 0:
            return
        version = f"v{self.version}"
        merged = {name: file for rank_map in maps for name, file in rank_map.items()}
        self.client.update_weights_from_disk(str(write_index(self._staging, merged, self.hf)), weight_version=version)
        verify_weights(self.client, version=version)

    def ensure_engines(self) -> list[str]:
        """Every rank: find engines without the current weight version (rank 0 asks them) and push again if any.

        Returns the stale engines' URLs (empty on ranks > 0 and when all are current)."""
        stale = [c.base_url for c in self.client.stale(f"v{self.version}")] if self.rank == 0 else []
        flag = torch.tensor([len(stale)], dtype=torch.int64, device=local_device())  # NCCL broadcasts device tensors
        dist.broadcast(flag, src=0)
        if int(flag):
            if self.rank == 0:
                logger.warning("engines %s do not hold weight version v%d: pushing the weights again", stale,
                               self.version)
            self.sync_weights(repush=True)
        return stale

    def save(self) -> None:
        checkpoint.save(self.cfg.save, self.iteration, self.version, self.model, self.optimizer, self.hf,
                        data_state=self.data_state)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        if self.sync is not None:
            self.sync.close()
        if self.client is not None:
            self.client.close()
        if self.replay is not None:
            self.replay.remove()
        if self.reference is not None:
            self.reference.close()
