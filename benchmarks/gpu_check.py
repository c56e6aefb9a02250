"""The CUDA path against the CPU path on the same inputs, and two device timings, in one summary table.

    python benchmarks/gpu_check.py --device cuda   # scripts/gpu_check.sh (one H100/H200, a few minutes)
    python benchmarks/gpu_check.py --device cpu    # dry run: both sides on the CPU (checks the script itself)

Each side runs in a subprocess of its own (the CPU side with CUDA hidden, so it takes the CPU path: gloo and the CPU
shims, and first: it draws the weights), one rank, the tiny Qwen3-MoE model with the same weights and 8 packed samples:
  loss path    old log-probs [t] and one forward-backward of the VESPO loss (fp32): max |Δ logp|, |Δ loss|
  r3 replay    the forward under R3 replay of the model's own live routing: max |Δ logp| to the live forward
               on the same side (0 expected: same experts) and to the other side
  bf16 step    one Adam step, bf16 + Megatron's distributed optimizer: |Δ loss|, relative |Δ grad norm|
  logprob ms   vocab_parallel_logprobs vs naive log_softmax forward + backward, [1024, 151936] bf16 logits
  replay ms    forward of 16×256 tokens, live vs R3 replay (median of 10)
Bounds: fp32 paths 1e-4 (different kernels and reduction orders), bf16 step 16·2^-8 relative (tests/distributed/
test_bf16.py). Timings are not compared across sides (the CPU side runs a smaller size); ratios only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

FP32_BOUND, BF16_BOUND = 1e-4, 16 * 2.0 ** -8


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    """Median wall time (ms) of ``fn`` over ``repeats`` calls after one warm-up (device synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def side(small: bool, weights_file: str) -> dict:
    """Every check on this process's device (cuda if visible, else cpu); plain floats and lists. The weights come from
    ``weights_file``, written there by the first side to run (the CPU side: CUDA initialisation draws other numbers)."""
    import torch

    from tests.distributed.optimizer_cases import ADAM, main_param_dtypes
    from tests.distributed.parallel_cases import initial_weights, make_samples, micro_batches
    from vespo_megatron.hf_config import tiny_hf_config
    from vespo_megatron.megatron.device import local_device
    from vespo_megatron.megatron.logprobs import vocab_parallel_logprobs
    from vespo_megatron.megatron.loss import LossSettings
    from vespo_megatron.megatron.model import build_model
    from vespo_megatron.megatron.parallel import init_parallel
    from vespo_megatron.megatron.step import build_optimizer, forward_backward, old_log_probs, wrap_ddp, zero_grads
    from vespo_megatron.megatron.weights import load_global
    from vespo_megatron.packing.reference import pack
    from vespo_megatron.packing.sample import Sample
    from vespo_megatron.routing.replay import RoutingReplay
    from vespo_megatron.routing.shard import batch_shard
    from vespo_megatron.routing.trace import pack as pack_trace
    from vespo_megatron.megatron.batch import micro_batch

    init_parallel()
    out: dict = {"device": str(local_device())}
    hf = tiny_hf_config("qwen3_moe")
    if os.path.getsize(weights_file) == 0:
        torch.save({k: v.cpu() for k, v in initial_weights(hf, torch.float32).items()}, weights_file)
    weights = torch.load(weights_file)
    samples = make_samples(8)
    settings = LossSettings(name="vespo", old_from_rollout=True)

    # loss path (fp32)
    model = build_model(hf, dtype=torch.float32)
    load_global(model, weights)
    ddp = wrap_ddp(model)
    mbs = micro_batches(samples, 2, 1, 0, 1, 0)
    olds = old_log_probs(ddp, mbs)
    zero_grads(ddp)
    metrics = forward_backward(ddp, [mb.with_old_log_prob(o) for mb, o in zip(mbs, olds)], settings)
    out["logp"] = torch.cat(olds).cpu().tolist()
    out["loss"] = float(sum(m["loss"] for m in metrics))

    # R3 replay of the model's own live routing
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.router")]
    maps: dict[int, torch.Tensor] = {}
    hooks = [r.register_forward_hook(lambda m, i, o: maps.__setitem__(m.layer_number, o[1])) for r in routers]
    batch = pack(samples, sample_ids=list(range(len(samples))))
    mb = micro_batch(batch)
    with torch.no_grad():
        live = old_log_probs(ddp, [mb])[0]
    for hook in hooks:
        hook.remove()
    k = hf.num_experts_per_tok
    ids = torch.stack([maps[n].nonzero()[:, 1].view(-1, k).cpu() for n in sorted(maps)], dim=1).numpy()
    replay = RoutingReplay(model, "r3")
    trace = pack_trace([ids[batch.seq_index[0] == i] for i in range(len(samples))], replay.spec)
    local = batch_shard(trace, batch, 0, 0, replay.layer_columns)
    with replay.phase("old_logprob", [local]):
        replayed = old_log_probs(ddp, [mb])[0]
    out["replay_vs_live"] = float((replayed - live).abs().max())
    out["replay_logp"] = replayed.cpu().tolist()

    # replay timing: live vs replayed forward of a larger micro-batch
    n, length = (4, 64) if small else (16, 256)
    gen = torch.Generator().manual_seed(1)
    big = pack([Sample(prompt=torch.randint(0, 256, (length // 2,), generator=gen).numpy(),
                       response=torch.randint(0, 256, (length // 2,), generator=gen).numpy()) for _ in range(n)],
               sample_ids=list(range(n)))
    big_mb = micro_batch(big)
    maps.clear()
    hooks = [r.register_forward_hook(lambda m, i, o: maps.__setitem__(m.layer_number, o[1])) for r in routers]

    def forward() -> None:
        with torch.no_grad():
            model(big_mb.tokens[None], big_mb.position_ids[None], None, packed_seq_params=big_mb.packed_seq_params())

    forward()
    for hook in hooks:
        hook.remove()
    big_ids = torch.stack([maps[n].nonzero()[:, 1].view(-1, k).cpu() for n in sorted(maps)], dim=1).numpy()
    big_local = batch_shard(pack_trace([big_ids[big.seq_index[0] == i] for i in range(n)], replay.spec), big, 0, 0,
                            replay.layer_columns)
    out["live_ms"] = _timed(forward, 10)

    def replayed_forward() -> None:
        with replay.phase("old_logprob", [big_local]):
            forward()

    out["replay_ms"] = _timed(replayed_forward, 10)
    replay.remove()

    # bf16 step with the distributed optimizer
    model16 = build_model(hf, dtype=torch.bfloat16)
    load_global(model16, weights)
    ddp16 = wrap_ddp(model16, use_distributed_optimizer=True)
    optimizer = build_optimizer(ddp16, **ADAM)
    zero_grads(ddp16)
    metrics = forward_backward(ddp16, micro_batches(samples, 2, 1, 0, 1, 0), settings)
    ok, grad_norm, _ = optimizer.step()
    out["bf16_loss"] = float(sum(m["loss"] for m in metrics))
    out["bf16_grad_norm"] = float(grad_norm)
    out["bf16_ok"] = bool(ok) and main_param_dtypes(optimizer) == {"torch.float32"}

    # log-prob timing: chunked (ours) vs naive log_softmax, forward + backward
    tokens, vocab = (128, 8192) if small else (1024, 151_936)
    dev = local_device()
    logits = torch.randn(tokens, vocab, device=dev, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=dev)

    def chunked() -> None:
        logp, entropy = vocab_parallel_logprobs(logits * 1, labels, inplace_backward=True)
        (logp.sum() + entropy.sum()).backward()

    def naive() -> None:
        lp = torch.log_softmax(logits.float(), dim=-1)
        (lp.gather(-1, labels[:, None]).sum() - (lp.exp() * lp).sum()).backward()

    out["chunked_ms"], out["naive_ms"] = _timed(chunked, 5), _timed(naive, 5)
    return out


def _run_side(device: str, small: bool, weights_file: str) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--side", f.name, "--weights", weights_file] + (["--small"] if small else [])
        subprocess.run(cmd, check=True, env=env)
        with open(f.name) as fh:
            return json.load(fh)


def _max_diff(a: list, b: list) -> float:
    return max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: dry run, both sides on CPU")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help="small timing sizes (the CPU dry run)")
    args = parser.parse_args()
    if args.side:
        result = side(args.small, args.weights)
        with open(args.side, "w") as fh:
            json.dump(result, fh)
        return
    small = args.device == "cpu"
    with tempfile.NamedTemporaryFile(suffix=".pt") as weights:  # empty: the CPU side (first) writes the weights
        cpu = _run_side("cpu", True, weights.name)
        dev = _run_side(args.device, small, weights.name)
    rows = [
        ("loss path: max|Δ logp|", _max_diff(dev["logp"], cpu["logp"]), FP32_BOUND),
        ("loss path: |Δ loss|", abs(dev["loss"] - cpu["loss"]), FP32_BOUND),
        ("r3 replay vs live (same side)", dev["replay_vs_live"], FP32_BOUND),
        ("r3 replay: max|Δ logp| vs cpu", _max_diff(dev["replay_logp"], cpu["replay_logp"]), FP32_BOUND),
        ("bf16 dist-opt step: |Δ loss| rel", abs(dev["bf16_loss"] - cpu["bf16_loss"]) / max(1.0, abs(cpu["bf16_loss"])),
         BF16_BOUND),
        ("bf16 dist-opt step: |Δ norm| rel",
         abs(dev["bf16_grad_norm"] - cpu["bf16_grad_norm"]) / max(1.0, cpu["bf16_grad_norm"]), BF16_BOUND),
    ]
    print(f"gpu_check: {dev['device']} vs cpu")
    print(f"{'check':<36}{'value':>12}{'bound':>12}  ok")
    failed = False
    for name, value, bound in rows:
        ok = value <= bound
        failed |= not ok
        print(f"{name:<36}{value:>12.3e}{bound:>12.1e}  {'yes' if ok else 'NO'}")
    print(f"{'bf16 step ok, fp32 main params':<36}{str(dev['bf16_ok']):>12}{'':>12}  {'yes' if dev['bf16_ok'] else 'NO'}")
    failed |= not dev["bf16_ok"]
    print(f"{'logprob fwd+bwd ms chunked/naive':<36}{dev['chunked_ms']:>8.2f}/{dev['naive_ms']:<8.2f}"
          f" ratio {dev['chunked_ms'] / dev['naive_ms']:.3f}")
    print(f"{'forward ms replay/live':<36}{dev['replay_ms']:>8.2f}/{dev['live_ms']:<8.2f}"
          f" ratio {dev['replay_ms'] / dev['live_ms']:.3f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
