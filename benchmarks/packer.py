"""Packer speed: C++ vs the numpy reference vs a plain memcpy of the same output bytes, measured in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packer.py [--samples 256 --max-tokens 8192 --layers 48 --topk 8]

Workload: samples with prompts of 64..1024 tokens and responses filling up to --max-tokens, rollout log-probs
(float32, one per response token), a uint8 loss mask and a routing trace [n − 1, layers, topk]. The memcpy baseline
allocates a fresh buffer of the packer's total output bytes and copies a same-sized source into it (the packer
also writes fresh arrays). Times are the best of --repeats runs.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

from vespo_megatron.packing import PackedBatch, Sample, native, reference

OUTPUT_FIELDS = ("tokens", "position_ids", "seq_index", "loss_mask", "rollout_logprobs", "rollout_logprob_valid",
                 "routing")


def make_samples(args: argparse.Namespace) -> list[Sample]:
    rng = np.random.default_rng(args.seed)
    samples = []
    for _ in range(args.samples):
        p = int(rng.integers(64, 1025))
        r = int(rng.integers(0, args.max_tokens - p + 1))
        samples.append(Sample(
            prompt=rng.integers(0, 150_000, p),
            response=rng.integers(0, 150_000, r),
            rollout_logprobs=-rng.exponential(size=r).astype(np.float32),
            loss_mask=np.ones(r, np.uint8),
            routing=rng.integers(0, 128, (p + r - 1, args.layers, args.topk), dtype=np.uint8),
        ))
    return samples


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function; rounds interleave the functions so background load hits all alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def output_bytes(batch: PackedBatch) -> int:
    return sum(getattr(batch, f).nbytes for f in OUTPUT_FIELDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    samples = make_samples(args)
    kwargs = {"cp": args.cp, "sp": args.sp}
    batch = native.pack(samples, **kwargs)
    nbytes = output_bytes(batch)
    source = np.ones(nbytes, np.uint8)

    def memcpy() -> None:
        np.copyto(np.empty(nbytes, np.uint8), source)

    best = best_of({"cpp": lambda: native.pack(samples, **kwargs), "numpy": lambda: reference.pack(samples, **kwargs),
                    "memcpy": memcpy}, args.repeats)
    t_cpp, t_ref, t_copy = best["cpp"], best["numpy"], best["memcpy"]
    print(f"{args.samples} samples, {batch.stats.tokens} tokens, routing {args.layers}x{args.topk} uint8, "
          f"cp={args.cp} sp={args.sp}: output {nbytes / 2**20:.1f} MiB")
    print(f"C++ pack      {t_cpp * 1e3:8.1f} ms  ({nbytes / t_cpp / 2**30:.2f} GiB/s)")
    print(f"numpy pack    {t_ref * 1e3:8.1f} ms")
    print(f"memcpy        {t_copy * 1e3:8.1f} ms  ({nbytes / t_copy / 2**30:.2f} GiB/s)")
    print(f"numpy / C++   {t_ref / t_cpp:8.2f}x   (target >= 10)")
    print(f"C++ / memcpy  {t_cpp / t_copy:8.2f}x   (target <= 2)")


if __name__ == "__main__":
    main()
