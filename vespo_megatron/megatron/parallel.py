"""Process groups for Megatron-Core (gloo on CPU, NCCL on GPU) and a launcher that runs a function on N local ranks.

``spawn(fn, world_size, *args)`` starts ``world_size`` processes, each running ``fn(rank, *args)`` with
torch.distributed initialised (loopback rendezvous), and returns the per-rank results in rank order. ``fn`` must be
importable (a module-level function). A failure on any rank raises in the caller with that rank's traceback.
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from queue import Empty
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from vespo_megatron import logs
from vespo_megatron.megatron import compat
from vespo_megatron.megatron.device import set_local_device, use_cpu


def backend() -> str:
    return "gloo" if use_cpu() else "nccl"


def init_parallel(tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1, etp: int | None = None, seed: int = 1234) -> None:
    """Initialise torch.distributed (from the env:// variables) and Megatron's model-parallel groups and RNG."""
    compat.install()
    set_local_device()
    if not dist.is_initialized():
        if "RANK" in os.environ:  # torchrun / srun: env:// rendezvous
            dist.init_process_group(backend())
        else:  # a plain single process: a private store, nothing written to the environment
            store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
            dist.init_process_group(backend(), store=store, rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tp * pp * cp) or (world // pp) % (ep * (etp or 1)):
        raise ValueError(f"world size {world} does not fit tp={tp} pp={pp} cp={cp} ep={ep} etp={etp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    model_parallel_cuda_manual_seed(seed)


@dataclass(frozen=True)
class Ranks:
    """This process's place in Megatron's groups: sizes and ranks of TP (= SP), CP, DP and PP."""

    tp: int
    tp_rank: int
    cp: int
    cp_rank: int
    dp: int
    dp_rank: int
    pp: int
    pp_rank: int

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def ranks() -> Ranks:
    """The :class:`Ranks` of this process, from ``parallel_state`` (after :func:`init_parallel`)."""
    ps = parallel_state
    return Ranks(
        tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        cp=ps.get_context_parallel_world_size(), cp_rank=ps.get_context_parallel_rank(),
        dp=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
        pp=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
    )


def loss_groups() -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Megatron's tensor-parallel group (the vocabulary shards of the logits) and context-parallel group."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("Megatron's model-parallel groups are not initialised (initialize_model_parallel)")
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_context_parallel_group()


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    torch.set_num_threads(1)
    logs.configure_from_env()
    try:
        compat.install()
        set_local_device()
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
        dist.init_process_group(backend(), store=store, rank=rank, world_size=world_size)
        # plain pickle: tensors travel by value (torch's queue reductions share fds that die with this process)
        queue.put((rank, True, pickle.dumps(fn(rank, *args))))
    except BaseException:  # noqa: BLE001 - the traceback travels to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        destroy_parallel()


def _deaths(procs: list, results: dict) -> list[str]:
    """One line per rank process that exited without reporting: the signal that killed it, or its exit code."""
    out = []
    for rank, proc in enumerate(procs):
        code = proc.exitcode
        if code is None or code == 0 or rank in results:
            continue
        if code < 0:
            out.append(f"rank {rank} was killed by signal {signal.Signals(-code).name}; the job is stopped (resume "
                       "with --load from the last complete checkpoint)")
        else:
            out.append(f"rank {rank} died with exit code {code} before reporting")
    return out


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` gloo/NCCL ranks; return the results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # the parent binds the rendezvous store itself (port 0 -> a free port): no window for another process to take it
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    port = store.port
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, ok, payload = queue.get(timeout=0.5)
            except Empty:
                errors += _deaths(procs, results)[:1]
                if not errors and time.monotonic() > deadline:
                    errors.append(f"no result from every rank within {timeout:.0f} s")
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:  # a rank that died (killed) first makes the others fail in a collective: name it first
                time.sleep(0.5)
                errors += _deaths(procs, results)[:1] + [f"rank {rank} failed:\n{payload}"]
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else timeout)
            if proc.is_alive():
                proc.kill()
    del store
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
