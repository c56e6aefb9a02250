"""Push the trainer's weights to the rollout engines after a step, and check that they hold them.

Input: HF-named tensors ``[(name, tensor)]``, streamed (the converter's in-memory Megatron -> HF path). Transports:
- ``distributed`` (:class:`DistributedSync`): the trainer and every engine rank share one process group
  (``/init_weights_update_group`` once; NCCL on GPU, gloo on CPU); per update the tensors go in buckets of at most
  ``bucket_bytes`` (one ``/update_weights_from_distributed`` per bucket and engine, while rank 0 broadcasts each
  tensor of the bucket). Generation is paused around the update and the version is set, and the cache flushed, only
  with the last bucket: an interrupted sync leaves the engines paused at the old version, so no engine ever serves a
  half-updated model (the next sync re-pushes everything and continues generation). A failure inside a bucket (a
  broadcast that raises: an engine gone, the trainer's device lost) closes the group at once, so the engines waiting
  for the rest of the bucket fail their receive within a second instead of blocking until the group timeout. Host memory: one bucket plus the
  one tensor looked ahead;
- ``disk``: sharded safetensors (:func:`write_shards`, one shard in memory at a time) + ``update_weights_from_disk``;
- ``tensor``: ``update_weights_from_tensor`` (in-process engine; SGLang HTTP with CUDA IPC on the same node).
Checks (each optional, at least one must run): the engine reports ``version``; per-tensor digests equal those of the
sent tensors cast to the engine's dtype (in-process CPU engine only); the engine's log-probs of a fixed probe
sequence match the trainer's within ``atol`` (works against any SGLang).
"""
from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vespo_megatron.rollout.engines import EnginePool
from vespo_megatron.rollout.client import RolloutError
from vespo_megatron.rollout.weight_group import WeightGroup, open_group
from vespo_megatron.rollout.weight_names import mismatched_weights

log = logging.getLogger(__name__)
TRANSPORTS = ("distributed", "disk", "tensor")
DEFAULT_BUCKET_MB = 512


class WeightSyncError(RuntimeError):
    """The engine does not hold the weights that were sent; the message says which check failed."""


@dataclass(frozen=True)
class Probe:
    """A fixed sequence [T] and the trainer's log-probs [T − 1] of its tokens 1.. (T = 1)."""

    token_ids: list[int]
    logprobs: np.ndarray
    atol: float = 1e-4


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
            ) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
    """Group a stream into (bucket, is_last) with sum(nbytes) <= ``bucket_bytes`` (a larger tensor goes alone).

    One tensor is looked ahead (to know which bucket is the last), so at most one bucket + one tensor are held
    when the consumer empties each bucket (``bucket.clear()``) before asking for the next.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if bucket and size + nbytes(tensor) > bucket_bytes:
            yield bucket, False
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes(tensor)
    if bucket:
        yield bucket, True


def write_shards(named_tensors: Iterable[tuple[str, torch.Tensor]], directory: str | Path, prefix: str,
                 max_shard_bytes: int) -> dict[str, str]:
    """Write the stream as safetensors files ``{prefix}-{k:05d}.safetensors`` of <= ``max_shard_bytes`` each (a larger
    tensor alone); returns {tensor name: file name} for the index. One shard is held in memory at a time."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for k, (bucket, _) in enumerate(buckets(named_tensors, max_shard_bytes)):
        filename = f"{prefix}-{k:05d}.safetensors"
        save_file({name: t.detach().cpu().contiguous() for name, t in bucket}, directory / filename,
                  metadata={"format": "pt"})
        weight_map.update({name: filename for name, _ in bucket})
        bucket.clear()  # written: free it before the next shard is gathered
    return weight_map


def write_index(directory: str | Path, weight_map: dict[str, str], hf_config: Any) -> Path:
    """config.json + ``model.safetensors.index.json`` over the shards written by every rank (HF's sharded layout)."""
    from safetensors import safe_open

    directory = Path(directory)
    hf_config.save_pretrained(directory)
    total = 0
    for filename in sorted(set(weight_map.values())):
        with safe_open(str(directory / filename), "pt") as handle:
            for key in handle.keys():
                total += int(np.prod(handle.get_slice(key).get_shape(), dtype=np.int64)) * _dtype_size(handle, key)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return directory


def _dtype_size(handle: Any, key: str) -> int:
    sizes = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
    return sizes[handle.get_slice(key).get_dtype()]


def master_address(engine_urls: Iterable[str]) -> str:
    """The address the engines reach training rank 0 at: loopback when every engine is local, else this host's."""
    from urllib.parse import urlparse

    local = {"127.0.0.1", "localhost", "::1"}
    if all(urlparse(url).hostname in local for url in engine_urls):
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


def free_port(address: str) -> int:
    """A port free on ``address`` now (the trainer binds it for the group's rendezvous right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


class DistributedSync:
    """The trainer's side of the weight-update group with one or more SGLang HTTP engines.

    Args:
        engines: an :class:`~.engines.EnginePool` (each engine's ranks join as rank_offset + tp_rank).
        master_address: an address of this (rank-0 trainer) host the engines can reach.
        master_port: the rendezvous port (0: a free one at each connect).
        backend: "nccl" (tensors on the GPU) or "gloo".
        bucket_bytes: the most bytes per ``/update_weights_from_distributed`` request.
        pause_mode: how generation is paused around an update ("retract": requests in flight resume after it).
    """

    def __init__(self, engines: EnginePool, master_address: str = "127.0.0.1", master_port: int = 0, *,
                 backend: str = "gloo", group_name: str = "weight_update_group",
                 bucket_bytes: int = DEFAULT_BUCKET_MB << 20, pause_mode: str = "retract", timeout_s: float = 300.0):
        self.engines = engines
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend
        self.group_name = group_name
        self.bucket_bytes = bucket_bytes
        self.pause_mode = pause_mode
        self.timeout_s = timeout_s
        self.group: WeightGroup | None = None
        self._pool = ThreadPoolExecutor(max_workers=len(engines.clients), thread_name_prefix="weight-sync")

    def connect(self) -> None:
        """``/init_weights_update_group`` on every engine while this process joins as rank 0."""
        if self.group is not None:
            return
        clients = self.engines.clients
        sizes = self.engines.on_all(lambda c: c.tp_size(), "server_info")
        offsets = np.cumsum([1] + sizes[:-1]).tolist()
        world = 1 + sum(sizes)
        port = self.master_port or free_port(self.master_address)
        futures = [(client, self._pool.submit(client.init_weights_update_group, self.master_address, port, offset,
                                              world, self.group_name, self.backend))
                   for client, offset in zip(clients, offsets)]
        try:
            self.group = open_group(self.master_address, port, 0, world, self.group_name, self.backend,
                                    self.timeout_s)
        finally:
            self.engines._gather(futures, f"init_weights_update_group({self.master_address}:{port}, world {world})")
        log.info("weight-update group %s: %d engines, world %d, %s", self.group_name, len(clients), world,
                 self.backend)

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> int:
        """Pause, broadcast the stream bucket by bucket, set ``version`` with the last bucket, continue.

        Returns the bytes broadcast. On failure the engines stay paused at their old version.
        """
        self.connect()
        self.engines.on_all(lambda c: c.pause_generation(self.pause_mode), "pause_generation")
        sent = 0
        for bucket, last in buckets(named_tensors, self.bucket_bytes):
            sent += self._push_bucket(bucket, version if last else None)
            bucket.clear()  # sent: free it before the next one is gathered
        if not sent:  # nothing to send: only the version moves
            self.engines.on_all(lambda c: c.update_weight_version(version), "update_weight_version")
        self.engines.on_all(lambda c: c.continue_generation(), "continue_generation")
        return sent

    def _push_bucket(self, bucket: list[tuple[str, torch.Tensor]], version: str | None) -> int:
        device = self.group.device
        tensors = [t.detach().to(device).contiguous() for _, t in bucket]
        names = [name for name, _ in bucket]
        dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
        shapes = [list(t.shape) for t in tensors]
        futures = [(client, self._pool.submit(client.update_weights_from_distributed, names, dtypes, shapes,
                                              self.group_name, version, version is not None, self.timeout_s))
                   for client in self.engines.clients]
        what = f"update_weights_from_distributed({names[0]}..{names[-1]})"
        done = 0
        try:
            for tensor in tensors:
                self.group.broadcast(tensor)
                done += 1
        except BaseException as err:
            self._abandon_group(futures, what)
            if isinstance(err, Exception):
                raise WeightSyncError(f"weight sync interrupted inside a bucket, after {done} of {len(names)} tensors "
                                      f"(at {names[done]!r}): {err}; the weight-update group was closed (the engines "
                                      "keep their version and stay paused; the next push rebuilds the group)") from err
            raise
        self.engines._gather(futures, what)
        return sum(nbytes(t) for t in tensors)

    def _abandon_group(self, futures: list[tuple[Any, Any]], what: str) -> None:
        """After a failure inside a bucket: leave the group first — the engines waiting for the rest of the bucket
        see the peer gone and fail their receive at once instead of at the group timeout — then collect their
        (failed) answers and have them destroy the broken group (failures only logged)."""
        self.group.close()
        self.group = None
        try:
            self.engines._gather(futures, what)
        except RolloutError as err:
            log.warning("interrupted sync: %s", err)
        self.reset()

    def ensure(self, named_tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]], version: str) -> list[str]:
        """Re-push (a fresh stream from ``named_tensors()``) when an engine does not hold ``version`` — restarted
        since the last sync, or left paused by an interrupted one; the group is rebuilt first. Returns the stale
        engines' URLs (empty: nothing was sent)."""
        stale = [c.base_url for c in self.engines.stale(version)]
        if stale:
            log.warning("engines %s do not hold weight version %s: rebuilding the group and re-pushing", stale,
                        version)
            self.reset()
            self.push(named_tensors(), version)
        return stale

    def reset(self) -> None:
        """Leave the group; engines that still answer destroy theirs (failures are only logged)."""
        for client in self.engines.clients:
            try:
                client.destroy_weights_update_group(self.group_name)
            except RolloutError as err:
                log.warning("%s: %s", client.name, err)
        if self.group is not None:
            self.group.close()
            self.group = None

    def close(self) -> None:
        """``/destroy_weights_update_group`` on every engine and leave the group."""
        if self.group is not None:
            try:
                self.engines.on_all(lambda c: c.destroy_weights_update_group(self.group_name),
                                    "destroy_weights_update_group")
            finally:
                self.group.close()
                self.group = None
        self._pool.shutdown(wait=False)


def push_weights(client: Any, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str, *,
                 via: str = "tensor", hf_config: Any = None, staging_dir: str | Path | None = None,
                 sync: DistributedSync | None = None, shard_bytes: int = DEFAULT_BUCKET_MB << 20) -> None:
    """Send the tensors to the engine behind ``client`` (``via`` distributed: through ``sync``) at ``version``."""
    if via == "distributed":
        if sync is None:
            raise ValueError("via='distributed' needs a DistributedSync (sync=...)")
        sync.push(named_tensors, version)
    elif via == "tensor":
        client.update_weights_from_tensor(named_tensors, weight_version=version)
    elif via == "disk":
        if hf_config is None or staging_dir is None:
            raise ValueError("via='disk' needs hf_config and staging_dir (a directory the engine can read)")
        weight_map = write_shards(named_tensors, staging_dir, "model-rank00000", shard_bytes)
        client.update_weights_from_disk(str(write_index(staging_dir, weight_map, hf_config)), weight_version=version)
    else:
        raise ValueError(f"via must be one of {list(TRANSPORTS)}, got {via!r}")


def verify_weights(client: Any, *, version: str | None = None,
                   named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
                   probe: Probe | None = None) -> None:
    """Raise :class:`WeightSyncError` unless every requested check passes (version, digests, probe log-probs)."""
    if version is None and named_tensors is None and probe is None:
        raise ValueError("verify_weights needs at least one of version, named_tensors, probe")
    if version is not None and (held := client.get_weight_version()) != version:
        raise WeightSyncError(f"{getattr(client, 'name', 'the engine')} reports weight version {held!r}, "
                              f"expected {version!r}")
    if named_tensors is not None:
        named = list(named_tensors)
        bad = mismatched_weights(named, client.weights_checksum([name for name, _ in named]))
        if bad:
            raise WeightSyncError(f"{len(bad)} of {len(named)} tensors differ on the engine, first: {bad[:3]}")
    if probe is not None:
        got = client.score(probe.token_ids).astype(np.float64)
        want = np.asarray(probe.logprobs, np.float64)
        if got.shape != want.shape:
            raise WeightSyncError(f"probe: the engine scored {got.size} tokens, the trainer {want.size}")
        delta = np.abs(got - want)
        if not (delta <= probe.atol).all():
            worst = int(np.argmax(delta))
            raise WeightSyncError(f"probe log-probs differ: max |Δ| = {delta[worst]:.3g} at token {worst + 1} "
                                  f"(atol {probe.atol})")
