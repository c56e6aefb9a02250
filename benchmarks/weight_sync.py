"""Weight sync throughput and rank-0 memory at 8, 32 and 128 layers of the same layer size.

For each depth, in a fresh process (rank 0, the trainer): synthetic HF-named layer tensors are made on demand (the
model is never whole in memory, as the trainer's streaming gather) and pushed by ``DistributedSync`` to a sink engine
in another process (the stand-in's HTTP server and its gloo receive path; the weights are dropped after receipt).
Printed per depth: the peak RSS of rank 0 during the sync above its RSS before it (VmHWM reset through
/proc/self/clear_refs) and its ratio to bucket + largest tensor. The baseline is measured in the same process after a
warm-up sync of 4096 16-byte tensors, whose own RSS growth is printed as "setup": the sync's threads and HTTP
connections, and gloo's transport, which grows by ~1.6-1.9 MiB over its first few thousand broadcasts and then stays
flat (measured: +1.9 MiB over 4000 broadcasts after 1, +0 KiB over 4000 after 3000) — a fixed cost of the process,
not data, which without the warm-up made the ratio 1.02-1.10. "after" is rank 0's RSS once the sync returned, above
the baseline (nothing held: ~0); bytes/s of the distributed path, of the disk path
(``write_shards`` + reading the shards back) and of a memcpy of the same bytes into one reused buffer, and their
ratios to memcpy. The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` (``--glibc-default`` leaves glibc's dynamic
threshold on): with it, glibc serves the freed tensors' sizes from its heap afterwards and fragmentation there makes
RSS creep up with the number of buckets although no more data is held.

    python benchmarks/weight_sync.py [--layers 8 32 128] [--hidden 512] [--experts 8] [--bucket-mb 16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WARMUP_TENSORS = 4096  # tiny tensors of the warm-up sync (gloo's transport reaches its steady state)

def _proc_status(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def layer_tensors(layers: int, hidden: int, experts: int):
    """(name, tensor) of a synthetic MoE model, one tensor made at a time: attention + router + per-expert MLPs."""
    ffn = hidden // 2
    for i in range(layers):
        prefix = f"model.layers.{i}"
        shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (hidden // 4, hidden),
                  "self_attn.v_proj.weight": (hidden // 4, hidden), "self_attn.o_proj.weight": (hidden, hidden),
                  "mlp.gate.weight": (experts, hidden)}
        for e in range(experts):
            shapes |= {f"mlp.experts.{e}.gate_proj.weight": (ffn, hidden), f"mlp.experts.{e}.up_proj.weight":
                       (ffn, hidden), f"mlp.experts.{e}.down_proj.weight": (hidden, ffn)}
        for name, shape in shapes.items():
            yield f"{prefix}.{name}", torch.full(shape, float(i), dtype=torch.float32)


class SinkEngine:
    """The stand-in's weight-update routes over an engine that drops what it receives (counts the bytes)."""

    def __init__(self):
        from vespo_megatron.rollout.control import GenerationControl

        self.control = GenerationControl()
        self.weight_version = "default"
        self._groups = {}
        self.received = 0

    from vespo_megatron.rollout.hf_engine import HFEngine as _HF
    init_weights_update_group = _HF.init_weights_update_group
    update_weights_from_distributed = _HF.update_weights_from_distributed
    destroy_weights_update_group = _HF.destroy_weights_update_group
    del _HF

    def update_weights_from_tensors(self, named, weight_version=None) -> int:
        self.received += sum(t.numel() * t.element_size() for _, t in named)
        if weight_version is not None:
            self.weight_version = weight_version
        return len(named)

    def update_weight_version(self, version: str) -> None:
        self.weight_version = version

    def get_server_info(self) -> dict:
        return {"tp_size": 1, "enable_deterministic_inference": True}

    def get_model_info(self) -> dict:
        return {"weight_version": self.weight_version}


def sink() -> None:
    from vespo_megatron.rollout.server import RolloutServer

    server = RolloutServer(SinkEngine())
    print(server.url, flush=True)
    server.serve_forever()


def child(layers: int, hidden: int, experts: int, bucket_mb: int) -> None:
    """Rank 0 of one depth: print {"bytes", "largest", "peak", "distributed_s", "disk_s", "memcpy_s"}."""

    from vespo_megatron.rollout.engines import EnginePool
    from vespo_megatron.rollout.weight_sync import DistributedSync, nbytes, write_shards

    engine = subprocess.Popen([sys.executable, __file__, "--sink"], stdout=subprocess.PIPE, text=True)
    try:
        url = engine.stdout.readline().strip()
        sync = DistributedSync(EnginePool([url], timeout_s=600), bucket_bytes=bucket_mb << 20, timeout_s=600)
        sync.connect()
        total = sum(nbytes(t) for _, t in layer_tensors(layers, hidden, experts))
        largest = max(nbytes(t) for _, t in layer_tensors(1, hidden, experts))
        before = _proc_status("VmRSS")
        sync.push(((f"warmup.{k}", torch.zeros(4)) for k in range(WARMUP_TENSORS)), "v0")
        baseline = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS: the peak below is the sync's
        start = time.perf_counter()
        sent = sync.push(layer_tensors(layers, hidden, experts), "v1")
        distributed = time.perf_counter() - start
        peak = _proc_status("VmHWM") - baseline
        after = _proc_status("VmRSS") - baseline
        assert sent == total and sync.engines.get_weight_version() == "v1"
        sync.close()
    finally:
        engine.terminate()
        engine.wait()
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import load_file

        start = time.perf_counter()
        files = set(write_shards(layer_tensors(layers, hidden, experts), tmp, "model-rank00000",
                                 bucket_mb << 20).values())
        for name in files:  # the engine reads them back
            load_file(Path(tmp) / name)
        disk = time.perf_counter() - start
    buffer = torch.empty(largest // 4, dtype=torch.float32)
    memcpy = 0.0
    for _, tensor in layer_tensors(layers, hidden, experts):
        start = time.perf_counter()
        buffer[:tensor.numel()].copy_(tensor.view(-1))
        memcpy += time.perf_counter() - start
    print(json.dumps({"bytes": total, "largest": largest, "setup": baseline - before, "peak": peak, "after": after,
                      "distributed_s": distributed, "disk_s": disk, "memcpy_s": memcpy}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--bucket-mb", type=int, default=16)
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        return sink()
    if args.child:
        return child(args.child, args.hidden, args.experts, args.bucket_mb)
    bucket = args.bucket_mb << 20
    env = dict(os.environ) if args.glibc_default else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    print(f"bucket {args.bucket_mb} MiB, hidden {args.hidden}, {args.experts} experts; rates in MB/s")
    print(f"{'layers':>6} {'MB':>7} {'setup MiB':>10} {'peak MiB':>9} {'after MiB':>10} {'peak/(bucket+largest)':>22} "
          f"{'distributed':>12} {'disk':>8} {'memcpy':>8} {'dist/memcpy':>12} {'disk/memcpy':>12}")
    for layers in args.layers:
        out = subprocess.run([sys.executable, __file__, "--child", str(layers), "--hidden", str(args.hidden),
                              "--experts", str(args.experts), "--bucket-mb", str(args.bucket_mb)],
                             capture_output=True, text=True, check=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rate = {k: r["bytes"] / r[f"{k}_s"] / 1e6 for k in ("distributed", "disk", "memcpy")}
        print(f"{layers:>6} {r['bytes'] / 1e6:>7.0f} {r['setup'] / 2**20:>10.1f} {r['peak'] / 2**20:>9.1f} "
              f"{r['after'] / 2**20:>10.1f} {r['peak'] / (bucket + r['largest']):>22.2f} {rate['distributed']:>12.0f} {rate['disk']:>8.0f} "
              f"{rate['memcpy']:>8.0f} {rate['distributed'] / rate['memcpy']:>12.3f} "
              f"{rate['disk'] / rate['memcpy']:>12.3f}")


if __name__ == "__main__":
    main()
