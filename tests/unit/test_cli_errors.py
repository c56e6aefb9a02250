"""A user error is one line ``vespo-megatron <cmd>: error: <flag>: <what>``, exit status 2, no traceback, before any
rank, engine or model starts (and before torch is even imported where the check needs no tensor)."""
import argparse
import json
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from vespo_megatron.cli import build_parser

HEAVY = ("torch", "megatron.core", "transformers")
PROBE = textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    from vespo_megatron.cli import main
    status = main(sys.argv[1:])
    heavy = sorted(name for name in {heavy!r} if name in sys.modules)
    print(json.dumps({{"status": status, "seconds": time.perf_counter() - start, "heavy": heavy}}))
""").format(heavy=HEAVY)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str]) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture
def dirs(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "not_hf").mkdir()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    return tmp_path


# (command line with {tmp} for the fixture folder, command as printed, flag named, what)
CASES = [
    ("train", "train", "--hf-checkpoint", "required"),
    ("train --hf-checkpoint {tmp}/missing", "train", "--hf-checkpoint", "no such directory"),
    ("train --hf-checkpoint {tmp}/hf --lr -1", "train", "--lr", "must be > 0"),
    ("train --hf-checkpoint {tmp}/hf --transformer-impl transformer_engine", "train", "--transformer-impl",
     "needs NVIDIA Transformer Engine"),
    ("train --hf-checkpoint {tmp}/hf --moe-grouped-gemm", "train", "--moe-grouped-gemm",
     "needs --transformer-impl transformer_engine"),
    ("train --hf-checkpoint {tmp}/hf --global-batch-size 5", "train", "--global-batch-size", "does not divide"),
    ("train --hf-checkpoint {tmp}/hf --loss nope", "train", "--loss", "invalid choice"),
    ("train --hf-checkpoint {tmp}/hf --micro-batch-size abc", "train", "--micro-batch-size", "invalid int"),
    ("train --hf-checkpoint {tmp}/hf --bogus 1", "train", "--bogus", "unrecognized argument"),
    ("train --hf-checkpoint {tmp}/hf --sglang-url http://127.0.0.1:{port}", "train", "--sglang-url",
     "unreachable"),
    ("train --hf-checkpoint {tmp}/hf --mcore-checkpoint {tmp}/not_a_checkpoint", "train", "--mcore-checkpoint",
     "not a Megatron distributed checkpoint"),
    ("train --hf-checkpoint {tmp}/hf --num-mini-batches 3", "train", "--num-mini-batches", "does not divide"),
    ("train --hf-checkpoint {tmp}/hf --loss-hparam k_pos=-1", "train", "--loss-hparam", "must be >= 0"),
    ("convert hf-to-mcore {tmp}/missing {tmp}/out", "convert hf-to-mcore", "HF_DIR", "no such directory"),
    ("convert mcore-to-hf {tmp}/missing {tmp}/out", "convert mcore-to-hf", "MCORE_DIR", "no such directory"),
    ("mismatch --hf-checkpoint {tmp}/not_hf --output-dir {tmp}/o", "mismatch", "--hf-checkpoint", "no config.json"),
    ("mismatch --hf-checkpoint {tmp}/hf", "mismatch", "--output-dir", "required"),
    ("mismatch --hf-checkpoint {tmp}/hf --output-dir {tmp}/o --temperature 0", "mismatch", "--temperature",
     "must be > 0"),
    ("serve --model-path {tmp}/missing", "serve", "--model-path", "no such directory"),
    ("demo --workdir {tmp}/busy", "demo", "--workdir", "not empty"),
]


@pytest.mark.parametrize("line, command, flag, what", CASES, ids=[c[0].split(" {")[0] + f" {c[2]}" for c in CASES])
def test_user_error_is_one_line_exit_2_without_traceback(dirs, line, command, flag, what):
    result, stderr = _run(line.format(tmp=dirs, port=_closed_port()).split())
    lines = [text for text in stderr.splitlines() if text.strip()]
    assert result["status"] == 2, stderr
    assert len(lines) == 1, stderr
    assert re.fullmatch(rf"vespo-megatron {command}: error: {re.escape(flag)}: .*{re.escape(what)}.*", lines[0]), lines
    assert "Traceback" not in stderr
    assert result["seconds"] < 5.0, result
    assert result["heavy"] == [], f"{line}: imported {result['heavy']} before reporting the error"


def test_debug_shows_the_traceback(dirs):
    proc = subprocess.run([sys.executable, "-m", "vespo_megatron.cli", "serve", "--model-path", str(dirs / "missing"),
                           "--debug"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UsageError: --model-path" in proc.stderr


def _leaves(parser: argparse.ArgumentParser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for sub in subs:
        for child in dict.fromkeys(sub.choices.values()):
            yield from _leaves(child)


def test_every_flag_has_help_and_shows_its_default():
    leaves = list(_leaves(build_parser()))
    assert {leaf.prog for leaf in leaves} >= {"vespo-megatron train", "vespo-megatron convert hf-to-mcore",
                                              "vespo-megatron mismatch", "vespo-megatron serve"}
    for leaf in leaves:
        text = " ".join(leaf.format_help().split())
        for action in leaf._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{leaf.prog} {action.option_strings or action.dest}: no help text"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, f"{leaf.prog} {action.option_strings[0]}: default"
