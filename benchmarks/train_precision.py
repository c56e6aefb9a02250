"""Peak memory and step time of one Adam step at DP2 on CPU: bf16 vs fp32 and distributed vs plain optimizer.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_precision.py [--hidden 256 --experts 8 --vocab 8192 --steps 4]

Each configuration runs in 2 fresh gloo ranks (``spawn``): a Qwen3-MoE of the given width (4 layers) with the same
random weights, 8 samples per step in 2 micro-batches per rank, VESPO loss, Megatron's Adam. Per rank: the peak RSS
(VmHWM, MiB) after the steps, and the median wall time of the steps after the first (warm-up). Printed: both ranks'
mean per configuration and the ratios bf16/fp32 (plain optimizer) and distributed/plain (fp32), measured in the same
run. On CPU bf16 GEMMs are not faster than fp32 (no bf16 units used), so the time ratio says what the Float16Module
casts and the mixed-precision optimizer cost here; the memory ratio counts params, grads (fp32 in both), main params
and Adam state. The distributed optimizer keeps 1/DP of the main params and Adam state per rank.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

CONFIGS = {  # name -> (dtype, distributed optimizer)
    "fp32 plain": (torch.float32, False),
    "bf16 plain": (torch.bfloat16, False),
    "fp32 dist-opt": (torch.float32, True),
    "bf16 dist-opt": (torch.bfloat16, True),
}


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")


def weights_rank(rank: int, overrides: dict) -> dict:
    from tests.distributed.parallel_cases import initial_weights
    from vespo_megatron.hf_config import tiny_hf_config
    from vespo_megatron.megatron.parallel import init_parallel

    init_parallel()
    return initial_weights(tiny_hf_config("qwen3_moe", **overrides), torch.float32)


def measure_rank(rank: int, overrides: dict, dtype: torch.dtype, distributed_optimizer: bool, weights: dict,
                 steps: int) -> dict:
    """Peak RSS (MiB) and the median step time (s, steps after the first) of this rank."""
    from tests.distributed.optimizer_cases import ADAM, one_step
    from tests.distributed.parallel_cases import make_samples
    from vespo_megatron.hf_config import tiny_hf_config
    from vespo_megatron.megatron.model import build_model
    from vespo_megatron.megatron.parallel import init_parallel
    from vespo_megatron.megatron.step import build_optimizer, wrap_ddp
    from vespo_megatron.megatron.weights import load_global

    init_parallel()
    hf = tiny_hf_config("qwen3_moe", **overrides)
    model = build_model(hf, dtype=dtype)
    load_global(model, weights)
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed_optimizer)
    optimizer = build_optimizer(ddp, **ADAM)
    times = []
    for step in range(steps):
        samples = make_samples(8, seed=step, vocab=hf.vocab_size)
        start = time.perf_counter()
        one_step(ddp, optimizer, samples, 2)
        times.append(time.perf_counter() - start)
    return {"peak_mib": _peak_rss_mib(), "step_s": statistics.median(times[1:])}


def main() -> None:
    from vespo_megatron.megatron.parallel import spawn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    overrides = dict(hidden_size=args.hidden, intermediate_size=2 * args.hidden, moe_intermediate_size=args.hidden,
                     num_experts=args.experts, vocab_size=args.vocab)
    weights = spawn(weights_rank, 1, overrides)[0]
    params = sum(w.numel() for w in weights.values())
    res = {}
    for name, (dtype, distributed) in CONFIGS.items():
        ranks = spawn(measure_rank, 2, overrides, dtype, distributed, weights, args.steps)
        res[name] = {key: statistics.mean(r[key] for r in ranks) for key in ("peak_mib", "step_s")}
    print(f"qwen3_moe hidden={args.hidden} experts={args.experts} vocab={args.vocab}: {params / 1e6:.2f} M params, "
          f"DP2 on CPU (gloo), median of {args.steps - 1} steps after 1 warm-up, mean over the 2 ranks")
    print(f"{'config':<16}{'peak RSS MiB':>14}{'step s':>10}")
    for name, r in res.items():
        print(f"{name:<16}{r['peak_mib']:>14.1f}{r['step_s']:>10.3f}")

    def ratio(a: str, b: str) -> str:
        return (f"{a} / {b}: peak RSS {res[a]['peak_mib'] / res[b]['peak_mib']:.3f}, "
                f"step time {res[a]['step_s'] / res[b]['step_s']:.3f}")

    print(ratio("bf16 plain", "fp32 plain"))
    print(ratio("fp32 dist-opt", "fp32 plain"))
    print(ratio("bf16 dist-opt", "bf16 plain"))


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
