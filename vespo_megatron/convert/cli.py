"""``vespo-megatron convert``: hf-to-mcore, mcore-to-hf and verify (also ``tools/convert_checkpoint.py``).

    vespo-megatron convert hf-to-mcore HF_DIR MCORE_DIR [--tp 2 --ep 4 ...] [--per-rank] [--dtype bfloat16]
    vespo-megatron convert mcore-to-hf MCORE_DIR HF_DIR [--hf-config DIR] [--max-shard-size 4GiB]
    vespo-megatron convert verify A B [--logits]

Exit status: 0 done / equal, 1 checkpoints differ (verify), 2 bad input (the message names the file and tensor).
Only argparse and the standard library are imported here; the work is imported inside the handlers. The error
policy (one line, exit 2) is the command line's (:mod:`vespo_megatron.cli`).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

DTYPES = ("keep", "float32", "bfloat16", "float16")


def parse_size(text: str) -> int:
    """'4GiB', '500MB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 500MB)")
    number, prefix, binary = match.groups()
    base = 1024 if binary or not prefix else 1000
    return int(float(number) * base ** "BKMGT".index((prefix or "B").upper()))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="keep", help="output dtype (keep: each tensor's own)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, files and peak memory; write nothing")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted conversion into DEST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fsync", action="store_true", help="fsync every file before renaming it into place")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_actions(subparsers.add_parser("convert", help="convert checkpoints HF <-> Megatron-Core (torch_dist) and verify"))


def _add_actions(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="convert_command", metavar="ACTION", required=True)

    h2m = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron-Core torch_dist checkpoint")
    h2m.add_argument("src", metavar="HF_DIR", help="HF checkpoint directory (config.json + safetensors)")
    h2m.add_argument("dst", metavar="MCORE_DIR", help="output directory (new, or --resume)")
    for name in ("tp", "pp", "ep"):
        h2m.add_argument(f"--{name}", type=int, default=1, help=f"{name.upper()} size to check against / shard for")
    h2m.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")
    h2m.add_argument("--per-rank", action="store_true", help="also write per-rank shards for the layout (DEST/ranks/)")
    h2m.add_argument("--stacked-layers", action="store_true", help="stacked [L, ...] layer keys (homogeneous models)")
    h2m.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="vocabulary padding multiple (x tp)")
    h2m.add_argument("--ignore", metavar="REGEX", help="skip source tensors whose name matches (e.g. MTP layers)")
    _common(h2m)
    h2m.set_defaults(func=_hf_to_mcore)

    m2h = sub.add_parser("mcore-to-hf", help="Megatron-Core torch_dist checkpoint -> HF directory")
    m2h.add_argument("src", metavar="MCORE_DIR", help="Megatron torch_dist checkpoint directory")
    m2h.add_argument("dst", metavar="HF_DIR", help="output directory (new, or --resume)")
    m2h.add_argument("--hf-config", help="HF config directory or config.json (default: MCORE_DIR/hf)")
    m2h.add_argument("--max-shard-size", type=parse_size, default=4 << 30, help="largest output shard (bytes; 4GiB, 500MB accepted)")
    m2h.add_argument("--emit-tied-lm-head", action="store_true", help="write lm_head.weight also for tied embeddings")
    _common(m2h)
    m2h.set_defaults(func=_mcore_to_hf)

    ver = sub.add_parser("verify", help="compare two checkpoints tensor by tensor (bitwise)")
    ver.add_argument("a", metavar="A", help="first checkpoint (HF or Megatron)")
    ver.add_argument("b", metavar="B", help="second checkpoint (HF or Megatron)")
    ver.add_argument("--logits", action="store_true", help="also run the HF and Megatron models (A, B: HF, Megatron)")
    ver.add_argument("--atol", type=float, default=1e-5, help="logits tolerance")
    ver.add_argument("--no-progress", action="store_true", help="no progress bar")
    ver.set_defaults(func=_verify)


def _dtype(name: str):
    import torch

    return None if name == "keep" else getattr(torch, name)


def _existing(path: str, metavar: str) -> None:
    """A user error naming ``metavar`` unless ``path`` is a directory."""
    from vespo_megatron.errors import UsageError

    if not Path(path).is_dir():
        raise UsageError(metavar, f"{path}: no such directory")


def _hf_to_mcore(args: argparse.Namespace) -> int:
    _existing(args.src, "HF_DIR")
    from vespo_megatron.convert.hf_to_mcore import HfToMcoreOptions, convert_hf_to_mcore
    from vespo_megatron.convert.spec import Layout

    options = HfToMcoreOptions(
        layout=Layout(args.tp, args.pp, args.ep, args.etp), dtype=_dtype(args.dtype),
        divisible_by=args.make_vocab_size_divisible_by, stacked=args.stacked_layers, ignore=args.ignore,
        per_rank=args.per_rank, resume=args.resume, dry_run=args.dry_run, progress=not args.no_progress,
        fsync=args.fsync)
    plan = convert_hf_to_mcore(args.src, args.dst, options)
    print(plan.render() if args.dry_run else f"wrote {args.dst} ({len(plan.files)} data files)")
    return 0


def _mcore_to_hf(args: argparse.Namespace) -> int:
    _existing(args.src, "MCORE_DIR")
    from vespo_megatron.convert.mcore_to_hf import McoreToHfOptions, convert_mcore_to_hf

    options = McoreToHfOptions(
        hf_config=args.hf_config, dtype=_dtype(args.dtype), max_shard_bytes=args.max_shard_size,
        emit_tied_lm_head=args.emit_tied_lm_head, resume=args.resume, dry_run=args.dry_run,
        progress=not args.no_progress, fsync=args.fsync)
    plan = convert_mcore_to_hf(args.src, args.dst, options)
    print(plan.render() if args.dry_run else f"wrote {args.dst} ({len(plan.files)} shards)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    _existing(args.a, "A")
    _existing(args.b, "B")
    from vespo_megatron.convert.verify import verify

    report = verify(args.a, args.b, show_progress=not args.no_progress)
    print(report.render())
    status = 0 if report.ok else 1
    if args.logits:
        from vespo_megatron.convert.errors import ConversionError
        from vespo_megatron.convert.parity import logits_parity
        from vespo_megatron.convert.verify import kind

        pair = {kind(Path(args.a)): args.a, kind(Path(args.b)): args.b}
        if set(pair) != {"hf", "mcore"}:
            raise ConversionError("--logits needs one HF and one Megatron checkpoint", file=args.b)
        result = logits_parity(pair["hf"], pair["mcore"])
        print("logits: " + ", ".join(f"{k} {v:.3g}" for k, v in result.items()) + f" (atol {args.atol:g})")
        status = max(status, int(result["max_abs_diff"] > args.atol))
    return status
