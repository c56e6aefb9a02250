"""Routing-replay costs: trace storage per token and MoE layer, and replayed vs live forward time.

Storage: synthetic SGLang traces (flat int32 base64, every HF layer, dense layers zero) of Qwen3-30B-A3B
(48 layers, 128 experts, top-8) and DeepSeek-V3 (61 layers, 3 dense, 256 experts, top-8) are decoded and packed;
prints bytes per (token, MoE layer) of the packed ids (budget: topk bytes, i.e. 1 byte per id), of SGLang's int32
and the offsets overhead, and the decode throughput.

Time: the tiny CPU model (tiny_hf_config("qwen3_moe"), 1 rank) runs one packed micro-batch forward live and under
R3 replay of its own live routing (same experts, so the same compute); blocks of 5 forwards alternate between the
two (the machine may be shared), and the median over adjacent block pairs of replay/live is printed (budget ≤ 1.03).

    OMP_NUM_THREADS=1 python benchmarks/replay.py [--tokens 16384] [--samples 16] [--sample-tokens 256] [--repeats 30]
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import statistics
import time

import numpy as np

MODELS = {  # name: (num_hf_layers, dense HF layers, experts, topk)
    "qwen3-30b-a3b": (48, (), 128, 8),
    "deepseek-v3": (61, (0, 1, 2), 256, 8),
}


def storage(tokens: int, samples: int) -> None:
    from vespo_megatron.routing.trace import SampleRouting, TracePart, TraceSpec, decode_batch

    rng = np.random.default_rng(0)
    for name, (layers, dense, experts, topk) in MODELS.items():
        spec = TraceSpec(layers, tuple(i for i in range(layers) if i not in dense), experts, topk)
        lens = rng.multinomial(tokens - samples, np.ones(samples) / samples) + 1
        routings = []
        for n in lens:
            keys = rng.random((n - 1, layers, experts), dtype=np.float32)
            rows = np.argpartition(keys, topk, axis=2)[:, :, :topk].astype(np.int32)
            rows[:, list(dense)] = 0
            routings.append(SampleRouting((TracePart(base64.b64encode(rows.tobytes()).decode()),), int(n)))
        start = time.thread_time()
        packed = decode_batch(routings, spec)
        seconds = time.thread_time() - start
        cells = int(packed.rows.sum()) * spec.num_moe_layers
        per_cell = packed.ids.nbytes / cells
        print(f"{name}: {packed.ids.dtype} ids {per_cell:.3f} B per (token, MoE layer) = {per_cell / topk:.3f} x "
              f"budget (topk={topk} B); SGLang int32 all layers {4 * topk * layers / spec.num_moe_layers:.1f} B; "
              f"offsets +{packed.offsets.nbytes / cells:.2e} B; decode+validate {cells * topk * 4 / seconds / 1e6:.0f} "
              f"MB/s of int32 ids")


def forward_time(samples: int, sample_tokens: int, repeats: int, block: int = 5) -> None:
    import torch

    from vespo_megatron.megatron.batch import micro_batch
    from vespo_megatron.hf_config import tiny_hf_config
    from vespo_megatron.megatron.model import build_model
    from vespo_megatron.megatron.parallel import destroy_parallel, init_parallel
    from vespo_megatron.packing.reference import pack as pack_batch
    from vespo_megatron.packing.sample import Sample
    from vespo_megatron.routing.replay import RoutingReplay
    from vespo_megatron.routing.shard import batch_shard
    from vespo_megatron.routing.trace import pack

    init_parallel()
    torch.manual_seed(0)
    model = build_model(tiny_hf_config("qwen3_moe"))
    rng = np.random.default_rng(1)
    half = sample_tokens // 2
    batch = pack_batch([Sample(prompt=rng.integers(0, 256, half), response=rng.integers(0, 256, sample_tokens - half))
                        for _ in range(samples)], sample_ids=list(range(samples)))
    mb = micro_batch(batch)

    def forward() -> None:
        model(mb.tokens[None], mb.position_ids[None], None, packed_seq_params=mb.packed_seq_params())

    routers = [m for n, m in model.named_modules() if n.endswith("mlp.router")]
    maps: dict[int, torch.Tensor] = {}
    hooks = [r.register_forward_hook(lambda m, i, o: maps.__setitem__(m.layer_number, o[1])) for r in routers]
    with torch.no_grad():
        forward()
    for hook in hooks:
        hook.remove()
    ids = np.stack([maps[n].nonzero()[:, 1].view(-1, 2).numpy() for n in sorted(maps)], axis=1)  # [t, L, k]
    replay = RoutingReplay(model, "r3")
    trace = pack([ids[batch.seq_index[0] == i] for i in range(samples)], replay.spec)
    local = batch_shard(trace, batch, 0, 0, replay.layer_columns)
    live, replayed = [], []  # per block: the median forward time
    with torch.no_grad():
        forward()  # warm-up
        for _ in range(repeats):
            for times, use_replay in ((live, False), (replayed, True)):
                block_times = []
                with replay.phase("old_logprob", [local] * block) if use_replay else contextlib.nullcontext():
                    for _ in range(block):
                        start = time.thread_time()
                        forward()
                        block_times.append(time.thread_time() - start)
                times.append(statistics.median(block_times))
    ratio = statistics.median(r / f for r, f in zip(replayed, live))
    print(f"tiny qwen3_moe forward, {mb.tokens.numel()} tokens: live {statistics.median(live) * 1e3:.2f} ms, "
          f"replay {statistics.median(replayed) * 1e3:.2f} ms; replay/live: median over adjacent block pairs "
          f"{ratio:.3f} (budget 1.03), of the fastest blocks {min(replayed) / min(live):.3f}")
    destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of the storage batch")
    parser.add_argument("--samples", type=int, default=16, help="samples (storage batch and forward micro-batch)")
    parser.add_argument("--sample-tokens", type=int, default=256, help="tokens per sample of the forward")
    parser.add_argument("--repeats", type=int, default=30, help="alternating blocks of 5 forwards each")
    args = parser.parse_args()
    storage(args.tokens, args.samples)
    forward_time(args.samples, args.sample_tokens, args.repeats)


if __name__ == "__main__":
    main()
