"""Per-token log-prob + entropy, forward + backward: naive log_softmax vs vocab_parallel_logprobs, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/logprobs.py [--tokens 1024 --vocab 151936 --dtype fp32|bf16]

(a) naive:   lp = log_softmax(logits.float()) [t, V];  logp = lp.gather(labels);  H = −Σ exp(lp)·lp
(b) chunked: vocab_parallel_logprobs(logits, labels, inplace_backward=True) (one rank, no padding)
Loss Σ_t a_t·logp_t + b_t·H_t with random a, b; backward to the logits. The logits are a view of a leaf [t, V] (as
the LM head's output is a non-leaf), refilled from a source copy before every step (not timed), so the in-place
backward leaves the gradient in the logits' storage and the naive one allocates it.

Each method runs in two fresh subprocesses. Memory (MiB, resident, minus the RSS after allocating logits, source
and labels), measured on the first step, before any other:
  saved    bytes autograd keeps for the backward (unique storages other than the logits', via a saved-tensors hook)
  RSS fwd  RSS after the forward (what stays resident between forward and backward)
  peak     peak RSS during forward + backward, in a process whose glibc malloc returns every block ≥ 128 KiB to the
           system on free (MALLOC_MMAP_THRESHOLD_), so RSS follows the live tensors
  peak*    the same with glibc's default (adaptive) threshold, in the timing process: freed blocks may stay resident
Time: median over --repeats forward + backward steps (after --warmup) of the forward's wall time, the step's wall
time and the step's user and system CPU time (getrusage). The system time is mostly page faults on fresh [t, V]
blocks, which glibc maps and unmaps on every step; user time is the compute (what a caching allocator leaves).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

METHODS = ("naive", "chunked")
TIMES = ("forward_s", "step_s", "user_s", "sys_s")
LIVE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def rss_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of this process in KiB, from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS where the kernel allows it (else it is the peak since start)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass


def worker(args: argparse.Namespace) -> dict:
    """Run one method: memory of the first step (MiB) and, with --repeats > 0, median forward/step times (s)."""
    import torch

    from vespo_megatron.megatron.logprobs import vocab_parallel_logprobs

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(args.tokens, args.vocab, generator=gen, dtype=dtype).mul_(2)
    leaf = torch.empty_like(source).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    a, b = torch.randn(args.tokens, generator=gen), torch.randn(args.tokens, generator=gen)
    saved: dict[int, int] = {}

    def record(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() != leaf.untyped_storage().data_ptr():
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def forward(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if args.method == "chunked":
            return vocab_parallel_logprobs(logits, labels, chunk_elems=args.chunk_elems, inplace_backward=True)
        lp = torch.log_softmax(logits.float(), dim=-1)
        return lp.gather(-1, labels[:, None])[:, 0], -(lp.exp() * lp).sum(-1)

    def step(probe: dict | None = None) -> tuple[float, float, float, float]:
        """One forward + backward; with ``probe``, record saved tensors and the RSS after the forward into it."""
        with torch.no_grad():
            leaf.copy_(source)
        leaf.grad = None
        usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        hooks = torch.autograd.graph.saved_tensors_hooks(record, lambda t: t) if probe is not None else nullcontext()
        with hooks:
            logp, entropy = forward(leaf.view_as(leaf))
        fwd = time.perf_counter() - start
        if probe is not None:
            probe["rss_forward_mib"] = (rss_kib("VmRSS") - probe["baseline"]) / 1024
        (a * logp + b * entropy).sum().backward()
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        return fwd, wall, after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime

    with torch.no_grad():
        leaf.copy_(source)
    out = {"baseline": rss_kib("VmRSS")}
    reset_peak()
    step(out)
    out.update(saved_mib=sum(saved.values()) / 2**20, peak_mib=(rss_kib("VmHWM") - out.pop("baseline")) / 1024)
    if args.repeats:
        for _ in range(args.warmup):
            step()
        times = [step() for _ in range(args.repeats)]
        out.update(zip(TIMES, (statistics.median(column) for column in zip(*times))))
    return out


def run_in_subprocess(method: str, args: argparse.Namespace, live_malloc: bool) -> dict:
    flags = {**vars(args), "repeats": 0 if live_malloc else args.repeats}
    cmd = [sys.executable, __file__, "--worker", method] + [
        f"--{k.replace('_', '-')}={v}" for k, v in flags.items() if k != "method" and v is not None
    ]
    env = {**os.environ, **LIVE_MALLOC_ENV} if live_malloc else os.environ
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-elems", type=int, default=None, help="default: the library's per-device chunk")
    parser.add_argument("--worker", choices=METHODS, dest="method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(worker(args)))
        return

    res = {}
    for m in METHODS:
        timed = run_in_subprocess(m, args, live_malloc=False)
        res[m] = {**run_in_subprocess(m, args, live_malloc=True), "peak_default_mib": timed["peak_mib"],
                  **{k: timed[k] for k in TIMES}}
    itemsize = {"fp32": 4, "bf16": 2}[args.dtype]
    print(f"t={args.tokens} V={args.vocab} {args.dtype} logits ({args.tokens * args.vocab * itemsize / 2**20:.0f} MiB), "
          f"threads={args.threads}, chunk_elems={args.chunk_elems}, median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'method':<9}{'fwd ms':>8}{'fwd+bwd ms':>12}{'user ms':>9}{'sys ms':>8}{'saved MiB':>11}"
          f"{'RSS fwd MiB':>13}{'peak MiB':>10}{'peak* MiB':>11}")
    for m, r in res.items():
        print(f"{m:<9}{r['forward_s'] * 1e3:>8.1f}{r['step_s'] * 1e3:>12.1f}{r['user_s'] * 1e3:>9.1f}"
              f"{r['sys_s'] * 1e3:>8.1f}{r['saved_mib']:>11.1f}{r['rss_forward_mib']:>13.1f}{r['peak_mib']:>10.1f}"
              f"{r['peak_default_mib']:>11.1f}")
    naive, chunked = res["naive"], res["chunked"]
    print(f"memory(chunked)/memory(naive) = {chunked['peak_mib'] / naive['peak_mib']:.3f} "
          f"(peak*: {chunked['peak_default_mib'] / naive['peak_default_mib']:.3f})  target <= 0.25")
    print(f"time(chunked)/time(naive)     = {chunked['step_s'] / naive['step_s']:.3f} "
          f"(user CPU: {chunked['user_s'] / naive['user_s']:.3f})  target <= 1.1")


if __name__ == "__main__":
    main()
