"""The Qwen3-30B-A3B example (examples/qwen3_30b_a3b): bash syntax of every script, and every `vespo-megatron`
invocation in them accepted by the real CLI parser.

Extraction: line continuations are joined, comment lines dropped, the command line is split like a shell word list
(quotes removed, cut at ; & | < > ( )), the words after `vespo-megatron` are its argv. `$VAR` / `${VAR}` take the
plausible values of VALUES below; `"${NAME[@]}"` expands a bash array assigned (`NAME=(…)` / `NAME+=(…)`) in any
script of the folder. The train flags are also checked against the paper's setup, expanded by bash itself.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from vespo_megatron.cli import UserInputError, build_parser
from vespo_megatron.train.flags import config_from_args

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "qwen3_30b_a3b"
SCRIPTS = sorted([*EXAMPLE.glob("*.sh"), *EXAMPLE.glob("*.sbatch")])
PROGRAM = "vespo-megatron"
OPERATORS = ";&|<>()"

# plausible values of the variables the scripts hand to vespo-megatron
VALUES = {
    "HF_DIR": "/ckpt/Qwen3-30B-A3B-Base",
    "WORK": "/shared/vespo",
    "MCORE_DIR": "/shared/vespo/mcore/qwen3-30b-a3b",
    "EXPORT_DIR": "/shared/vespo/hf-export/qwen3-30b-a3b",
    "DTYPE": "keep",
    "TP": "2",
    "EP": "8",
    "SGLANG_URL": "http://sglang-host:30000",
    "N": "16",
    "ROLLOUT_BATCH": "4096",
    "GLOBAL_BATCH": "2048",
    "REPLAY": "r3",
    "TRAIN_ITERS": "500",
    "SAVE_DIR": "/shared/vespo/runs/vespo-n16-r3/checkpoints",
    "SAVE_INTERVAL": "50",
    "LOG_DIR": "/shared/vespo/runs/vespo-n16-r3/logs",
}
ARRAY_REF = re.compile(r"\$\{(\w+)\[@\]\}")
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
ARRAY_START = re.compile(r"(?<![\w$])(\w+)\+?=\(")


def code(text: str) -> str:
    """``text`` with line continuations joined and comment lines dropped."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def words(text: str) -> list[str]:
    """Shell words of ``text``: quotes removed, operators as their own words, trailing comments dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=OPERATORS)
    lexer.whitespace_split = True
    return list(lexer)


def is_operator(word: str) -> bool:
    return all(c in OPERATORS for c in word)


def arrays(texts: list[str]) -> dict[str, list[str]]:
    """Every bash array assigned in ``texts``: name -> its words (``+=`` appends), in order."""
    found: dict[str, list[str]] = {}
    for text in texts:
        body = code(text)
        for match in ARRAY_START.finditer(body):
            items = words(body[match.end():])
            end = next(i for i, word in enumerate(items) if is_operator(word))  # ")" or ");" closes the list
            if not items[end].startswith(")"):
                raise ValueError(f"array {match.group(1)}: unexpected {items[end]!r} in its list")
            found.setdefault(match.group(1), []).extend(items[:end])
    return found


def expand(word: str, arrays_: dict[str, list[str]], where: str) -> list[str]:
    """One argv word -> its words after array and variable substitution; unknown names raise ValueError."""
    ref = ARRAY_REF.fullmatch(word)
    if ref:
        if ref.group(1) not in arrays_:
            raise ValueError(f"{where}: array {ref.group(1)} is not assigned in any example script")
        return [w for item in arrays_[ref.group(1)] for w in expand(item, arrays_, where)]

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in VALUES:
            raise ValueError(f"{where}: ${name} has no test value (add it to VALUES)")
        return VALUES[name]

    return [VARIABLE.sub(value, word)]


def invocations(text: str, arrays_: dict[str, list[str]], name: str) -> list[list[str]]:
    """The argv (after the program name) of every `vespo-megatron` command in script ``text``."""
    found = []
    for number, line in enumerate(code(text).splitlines(), 1):
        line_words = words(line)
        if PROGRAM not in line_words:
            continue
        argv: list[str] = []
        for word in line_words[line_words.index(PROGRAM) + 1:]:
            if is_operator(word):
                break
            argv += expand(word, arrays_, f"{name}:{number}")
        found.append(argv)
    return found


def parse(argv: list[str], where: str) -> argparse.Namespace:
    """The real CLI parser on ``argv``; a rejection raises ValueError with the one-line message (flag: what)."""
    try:
        return build_parser().parse_args(argv)
    except UserInputError as err:
        raise ValueError(f"{where}: `{PROGRAM} {shlex.join(argv)}` rejected: {err}") from None


@pytest.fixture(scope="module")
def example_arrays() -> dict[str, list[str]]:
    return arrays([p.read_text() for p in SCRIPTS])


def all_invocations(example_arrays: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """(script name, argv) of every `vespo-megatron` command in the example."""
    return [(p.name, argv) for p in SCRIPTS for argv in invocations(p.read_text(), example_arrays, p.name)]


def test_the_example_ships_its_scripts():
    assert {p.name for p in SCRIPTS} >= {"launch_sglang.sh", "convert.sh", "train_args.sh", "train_torchrun.sh",
                                         "train_slurm.sbatch"}
    assert (EXAMPLE / "README.md").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr, result.stderr


def test_every_invocation_parses(example_arrays):
    found = set()
    for name, argv in all_invocations(example_arrays):
        args = parse(argv, name)
        found.add((args.command, getattr(args, "convert_command", None)))
    assert found >= {("train", None), ("convert", "hf-to-mcore"), ("convert", "verify"), ("convert", "mcore-to-hf")}


def test_conversion_dry_run_comes_first(example_arrays):
    text = (EXAMPLE / "convert.sh").read_text()
    convert = [argv for argv in invocations(text, example_arrays, "convert.sh") if argv[:2] == ["convert", "hf-to-mcore"]]
    assert "--dry-run" in convert[0] and all("--dry-run" not in argv for argv in convert[1:]) and len(convert) > 1


@pytest.mark.parametrize("line,match", [
    ('vespo-megatron convert hf-to-mcore \\\n  "$HF_DIR" "$MCORE_DIR" --tpp "$TP"\n', "--tpp: unrecognized argument"),
    ("vespo-megatron train --routing-replay r4 --lr 1e-6  # replay mode that does not exist\n", "invalid choice: 'r4'"),
    ("vespo-megatron convert verify $HF_DIR\n", "B: required"),
    ('ARGS=(\n  --lr 1e-6\n  --no-such-flag 1\n)\ntorchrun --no-python vespo-megatron train --hf-checkpoint "$HF_DIR" '
     '"${ARGS[@]}"\n',
     "--no-such-flag: unrecognized argument"),
    ("vespo-megatron train --hf-checkpoint $HF_DRI\n", r"\$HF_DRI has no test value"),
    ('vespo-megatron train "${MISSING[@]}"\n', "array MISSING is not assigned"),
])
def test_a_wrong_script_fails_through_the_same_path(line, match):
    with pytest.raises(ValueError, match=match):
        for argv in invocations(line, arrays([line]), "bad.sh"):
            parse(argv, "bad.sh")


def test_every_real_invocation_rejects_an_unknown_flag(example_arrays):
    invocations_ = all_invocations(example_arrays)
    assert invocations_
    for name, argv in invocations_:
        with pytest.raises(ValueError, match="--not-a-flag: unrecognized argument"):
            parse([*argv, "--not-a-flag"], name)


@pytest.mark.parametrize("n", [4, 16, 32, 64])
def test_train_flags_follow_the_paper(n, tmp_path, monkeypatch):
    """train_args.sh expanded by bash for N = gbs/mbs: the VESPO paper's Qwen3-30B-A3B setup (docs/vespo.md), with
    Megatron-LM's flags (TE and grouped GEMM: Transformer Engine taken as installed, as on the H100 cluster)."""
    monkeypatch.setattr("vespo_megatron.train.config._importable", lambda module: True)
    script = 'set -euo pipefail; source "$1"; printf "%s\\0" "${TRAIN_ARGS[@]}"'
    env = {"PATH": os.environ["PATH"], "N": str(n), "WORK": str(tmp_path)}  # no inherited TP, HF_DIR, ...
    out = subprocess.run(["bash", "-c", script, "bash", str(EXAMPLE / "train_args.sh")], env=env,
                         capture_output=True, text=True, check=True).stdout
    args = parse(["train", *out.split("\0")[:-1]], "train_args.sh")
    cfg = config_from_args(args)
    assert (cfg.loss, cfg.routing_replay, cfg.official_aggregation) == ("vespo", "r3", False)
    assert cfg.hparams == {"c1_pos": 2.0, "c2_pos": 3.0, "c1_neg": 3.0, "c2_neg": 2.0}
    assert (cfg.lr, cfg.lr_warmup_iters, cfg.lr_decay_style, cfg.adam_beta1, cfg.adam_beta2) == (
        1e-6, 0, "constant", 0.9, 0.999)
    assert cfg.bf16 and cfg.use_distributed_optimizer and cfg.sequence_parallel and cfg.moe_grouped_gemm
    assert (cfg.transformer_impl, cfg.recompute_granularity, cfg.global_batch_size) == ("transformer_engine", "full",
                                                                                         256 * 8)
    assert (cfg.weight_decay, cfg.clip_grad, cfg.n_samples_per_prompt) == (0.01, 1.0, 8)
    assert (cfg.rollout_batch_size, cfg.num_mini_batches) == (256 * n, n)
    assert cfg.rollout_samples // cfg.num_mini_batches == 256 * 8  # one mini-batch = 256 prompts x 8 responses
    assert (cfg.tensor_model_parallel_size, cfg.expert_model_parallel_size, cfg.pipeline_model_parallel_size) == (2, 8, 1)
    assert cfg.sglang_url and args.mcore_checkpoint and cfg.save and cfg.tensorboard_dir and cfg.save_interval > 0


def test_conversion_tp_equals_training_tp():
    """The vocabulary is padded to 128 x TP at conversion: convert.sh's default TP must be the one train uses."""
    default = re.compile(r"^TP=\$\{TP:-(\d+)\}", re.MULTILINE)
    train_tp = default.search((EXAMPLE / "train_args.sh").read_text()).group(1)
    assert default.search((EXAMPLE / "convert.sh").read_text()).group(1) == train_tp == "2"


def test_sglang_server_captures_routing():
    text = code((EXAMPLE / "launch_sglang.sh").read_text())
    line = next(line for line in text.splitlines() if "sglang.launch_server" in line)
    argv = words(line)
    for flag in ("--model-path", "--tp", "--port", "--enable-return-routed-experts", "--chunked-prefill-size"):
        assert flag in argv, flag
    chunk = re.search(r"^CHUNKED_PREFILL=\$\{CHUNKED_PREFILL:-(-?\d+)\}", text, re.MULTILINE).group(1)
    assert int(chunk) > 0  # the capture buffer is sized from it; -1 would disable chunked prefill
    assert "--disable-radix-cache" in text and "--enable-deterministic-inference" in text
