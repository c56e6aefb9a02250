"""`vespo-megatron serve`: the CPU rollout engine behind SGLang's HTTP protocol (see rollout/server.py)."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve an HF MoE checkpoint on CPU with SGLang 0.5.23's HTTP API",
        description="Serve an HF directory (Qwen3-MoE, Mixtral) with SGLang 0.5.23's HTTP protocol on CPU. With a "
                    "tokenizer in the directory, text input and the text output field work; without one it behaves "
                    "as SGLang's --skip-tokenizer-init (input_ids only).")
    parser.add_argument("--model-path", required=True, help="HF directory (save_pretrained output)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    parser.add_argument("--port", type=int, default=30000, help="port (0 = any free port)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="engine dtype")
    parser.add_argument("--enable-return-routed-experts", action="store_true",
                        help="allow return_routed_experts (routing traces for replay)")
    parser.add_argument("--enable-deterministic-inference", action="store_true",
                        help="honour per-request sampling_seed (as SGLang, which ignores it without this flag)")
    parser.add_argument("--weight-version", default="default", help="initial weight version")
    parser.add_argument("--seed", type=int, default=0, help="seed for requests without sampling_seed")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vespo_megatron import preflight

    preflight.hf_dir(args.model_path, "--model-path")
    preflight.at_least(args.port, 0, "--port")
    from vespo_megatron.rollout.hf_engine import HFEngine
    from vespo_megatron.rollout.server import RolloutServer

    engine = HFEngine.from_pretrained(args.model_path, dtype=args.dtype, seed=args.seed,
                                      enable_return_routed_experts=args.enable_return_routed_experts,
                                      weight_version=args.weight_version,
                                      enable_deterministic_inference=args.enable_deterministic_inference)
    server = RolloutServer(engine, host=args.host, port=args.port)
    print(f"serving {args.model_path} ({args.dtype}) at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0
