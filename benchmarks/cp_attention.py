"""Context-parallel core attention on CPU: CP2 vs CP1 for one long packed sequence, time and peak memory as ratios.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cp_attention.py [--tokens 4096 --heads 8 --groups 2 --head-dim 64]

The local spec's ``PackedDotProductAttention`` (the one the CPU model runs) gets one THD sequence of --tokens tokens
(fp32, grouped-query heads), forward + backward of Σ out·w, on 1 gloo rank (CP1) and on 2 (CP2, each rank holding
the zig-zag chunks: K/V all-gathered over the CP group, dK/dV reduce-scattered back). Each rank is one process with
one thread, in a process whose glibc malloc returns every block ≥ 128 KiB on free (MALLOC_MMAP_THRESHOLD_), so RSS
follows the live tensors.

  wall  median over --repeats steps (after --warmup) of the step's wall time, the slowest rank's
  cpu   the same for the step's user + system CPU time of the rank's process (gloo threads included): the measure
        that holds on a shared machine, where the 2 ranks may not get a core each
  peak  peak RSS during the first step minus the RSS before it (inputs allocated), the largest over ranks (MiB)
The ratios CP2/CP1 are printed. Per rank, CP2 computes (2cp+1)·c² = 5·(T/4)² attention scores against the T²/2 of
CP1's causal kernel (0.625), and holds half the queries and gradients, but also the gathered K/V of the whole
sequence and a [c, ≤ 2cp·c] causal mask per local chunk (CPU SDPA has no bottom-right causal kernel). The mask is
shared by all heads, so the memory ratio improves with the head count (try --heads 32 --groups 4).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

from logprobs import LIVE_MALLOC_ENV, reset_peak, rss_kib


def rank_run(rank: int, args: dict, cp: int) -> dict:
    """One rank: peak RSS of the first step (MiB) and the median step time (s)."""
    import torch
    import torch.distributed as dist
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from vespo_megatron.megatron.layers import PackedDotProductAttention
    from vespo_megatron.hf_config import tiny_hf_config
    from vespo_megatron.megatron.model import transformer_config
    from vespo_megatron.megatron.parallel import init_parallel

    init_parallel(cp=cp)
    heads, groups, dim, tokens = args["heads"], args["groups"], args["head_dim"], args["tokens"]
    hf = tiny_hf_config("qwen3_moe", num_attention_heads=heads, num_key_value_heads=groups, head_dim=dim,
                        hidden_size=heads * dim)
    attention = PackedDotProductAttention(transformer_config(hf), 1, AttnMaskType.causal, "self")
    local = tokens // cp
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(local, n, dim, generator=gen).requires_grad_() for n in (heads, groups, groups))
    weight = torch.randn(local, heads * dim, generator=gen)
    cu = torch.tensor([0, tokens], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=tokens, max_seqlen_kv=tokens)

    def step() -> tuple[float, float]:
        for x in (q, k, v):
            x.grad = None
        dist.barrier()
        usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        (attention(q, k, v, None, packed_seq_params=params) * weight).sum().backward()
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        return wall, after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime

    baseline = rss_kib("VmRSS")
    reset_peak()
    step()
    peak = (rss_kib("VmHWM") - baseline) / 1024
    for _ in range(args["warmup"]):
        step()
    times = [step() for _ in range(args["repeats"])]
    return {"peak_mib": peak, "wall_s": statistics.median(w for w, _ in times),
            "cpu_s": statistics.median(c for _, c in times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.tokens % 4:
        parser.error("--tokens must be a multiple of 2·cp = 4")
    os.environ.update(LIVE_MALLOC_ENV, OMP_NUM_THREADS="1")  # the spawned ranks inherit it
    from vespo_megatron.megatron.parallel import spawn

    res = {}
    for cp in (1, 2):
        ranks = spawn(rank_run, cp, vars(args), cp)
        res[cp] = {key: max(r[key] for r in ranks) for key in ("wall_s", "cpu_s", "peak_mib")}
    print(f"one sequence of {args.tokens} tokens, {args.heads} query heads, {args.groups} kv groups, head dim "
          f"{args.head_dim}, fp32, forward + backward, median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'layout':<8}{'wall ms':>10}{'cpu ms':>10}{'peak MiB':>10}")
    for cp, r in res.items():
        print(f"{'CP' + str(cp):<8}{r['wall_s'] * 1e3:>10.1f}{r['cpu_s'] * 1e3:>10.1f}{r['peak_mib']:>10.1f}")
    print(f"time(CP2)/time(CP1) = {res[2]['cpu_s'] / res[1]['cpu_s']:.3f} CPU, {res[2]['wall_s'] / res[1]['wall_s']:.3f} "
          f"wall (load average {os.getloadavg()[0]:.1f})")
    print(f"peak(CP2)/peak(CP1) = {res[2]['peak_mib'] / res[1]['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
