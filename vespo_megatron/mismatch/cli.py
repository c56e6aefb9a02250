"""``vespo-megatron mismatch``: train-inference mismatch of one HF checkpoint, routing replay off vs on (R3).

    vespo-megatron mismatch --hf-checkpoint HF_DIR [--sglang-url URL] [--engine-dtype bf16] [--train-dtype fp32]
        [--num-prompts 8 --prompt-len 16 --max-new-tokens 32 --temperature 1.0 --seed 0]
        [--tensor-model-parallel-size 1 --expert-model-parallel-size 1] --output-dir DIR

Rollouts are generated once (routing captured) by the SGLang server at --sglang-url, or by the CPU engine started in
this process; the Megatron model of the same checkpoint scores them with replay off and on
(:mod:`vespo_megatron.mismatch.score`). Prints the table; writes mismatch.txt, mismatch.json and PNG plots into
--output-dir. Exit status: 0 done, 2 bad input (one line naming the flag). Only argparse and the standard library
are imported here.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-checkpoint", required=True, metavar="DIR",
                        help="HF directory (save_pretrained output): the training side's weights, and the engine's "
                             "when no --sglang-url is given")
    parser.add_argument("--sglang-url", metavar="URL",
                        help="running SGLang server (started with --enable-return-routed-experts) serving the same "
                             "weights; default: the CPU engine on --hf-checkpoint, in this process")
    parser.add_argument("--engine-dtype", choices=["bf16", "fp32"], default="bf16", help="in-process engine dtype")
    parser.add_argument("--train-dtype", choices=["fp32", "bf16"], default="fp32", help="Megatron model dtype")
    parser.add_argument("--prompts", metavar="FILE",
                        help="JSON lines, one list of token ids per prompt (default: --num-prompts random prompts)")
    parser.add_argument("--num-prompts", type=int, default=8, help="random prompts (without --prompts)")
    parser.add_argument("--prompt-len", type=int, default=16, help="tokens per random prompt")
    parser.add_argument("--n-samples-per-prompt", type=int, default=2, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="response length limit")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (training logits / T)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts and of the sampling")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP ranks of the Megatron side")
    parser.add_argument("--expert-model-parallel-size", type=int, default=1, help="EP ranks of the Megatron side")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="where mismatch.json and the plots go")
    parser.set_defaults(func=run)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_arguments(subparsers.add_parser(
        "mismatch", help="measure train-inference mismatch (rollout engine vs Megatron), routing replay off vs on",
        description=__doc__.splitlines()[0]))


def check(args: argparse.Namespace) -> None:
    """Every user error the flags can hold, before any engine or model starts (UsageError naming the flag)."""
    from vespo_megatron import preflight

    preflight.hf_dir(args.hf_checkpoint, "--hf-checkpoint")
    if args.prompts:
        preflight.existing_file(args.prompts, "--prompts")
    for flag in ("num_prompts", "prompt_len", "n_samples_per_prompt", "max_new_tokens", "tensor_model_parallel_size",
                 "expert_model_parallel_size", "micro_batch_size"):
        preflight.at_least(getattr(args, flag), 1, "--" + flag.replace("_", "-"))
    preflight.positive(args.temperature, "--temperature")
    if args.sglang_url:
        preflight.reachable(args.sglang_url)


def run(args: argparse.Namespace) -> int:
    check(args)
    from vespo_megatron.hf_config import load_hf_config
    from vespo_megatron.mismatch import inputs
    from vespo_megatron.mismatch.align import trace_spec
    from vespo_megatron.mismatch.report import JSON_NAME, format_table
    from vespo_megatron.mismatch.score import measure_mismatch

    hf = load_hf_config(args.hf_checkpoint)
    spec = trace_spec(hf)
    prompts = (inputs.read_prompts(args.prompts, hf.vocab_size) if args.prompts else
               inputs.synthetic_prompts(args.num_prompts, args.prompt_len, hf.vocab_size, args.seed))
    client = inputs.rollout_client(args.hf_checkpoint, spec, sglang_url=args.sglang_url,
                                   engine_dtype=args.engine_dtype, seed=args.seed)
    records = client.generate(prompts, {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature},
                              samples_per_prompt=args.n_samples_per_prompt, seed=args.seed,
                              return_routed_experts=True)
    columns = measure_mismatch(
        args.hf_checkpoint, records, train_dtype=args.train_dtype, temperature=args.temperature,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size, micro_batch_size=args.micro_batch_size,
        output_dir=args.output_dir)
    print(format_table(columns), flush=True)
    print(f"wrote {Path(args.output_dir) / JSON_NAME} and the plots", flush=True)
    return 0
