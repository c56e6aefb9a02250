"""A conversion killed with SIGKILL at a random point and resumed ends bitwise equal to an uninterrupted run, in both
directions; after every kill, each output file outside the journal is already complete (never a partial shard)."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vespo_megatron.convert.hf_to_mcore import HfToMcoreOptions, convert_hf_to_mcore
from vespo_megatron.convert.journal import JOURNAL_DIR
from vespo_megatron.convert.mcore_to_hf import McoreToHfOptions, convert_mcore_to_hf
from vespo_megatron.convert.synthetic import tiny_config, write_synthetic

ROOT = Path(__file__).resolve().parents[2]
LAYERS = 16


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    config = tiny_config("qwen3_moe", num_hidden_layers=LAYERS, hidden_size=128, moe_intermediate_size=256)
    write_synthetic(root / "hf", config)
    convert_hf_to_mcore(root / "hf", root / "mcore", HfToMcoreOptions(progress=False))
    convert_mcore_to_hf(root / "mcore", root / "hf_back", McoreToHfOptions(progress=False, max_shard_bytes=1 << 20))
    return {"root": root, "hf": root / "hf", "mcore": root / "mcore", "hf_back": root / "hf_back"}


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and JOURNAL_DIR not in p.parts}


def kill_after(args: list[str], dest: Path, units_done: int) -> bool:
    """Start the CLI, SIGKILL it once ``units_done`` units are journaled (polling every millisecond).

    On a loaded machine the child can finish between two polls; the conversion is then started again into an empty
    destination with an earlier kill point (down to the first unit), so the test always exercises a kill."""
    for attempt in range(6):
        if _start_and_kill(args, dest, units_done):
            return True
        if "--resume" in args:  # the resumed run finished: nothing left to kill, the final check still applies
            return False
        shutil.rmtree(dest)
        units_done = max(1, units_done // 2)
    raise AssertionError(f"the conversion always finished before the kill ({args})")


def _start_and_kill(args: list[str], dest: Path, units_done: int) -> bool:
    """True if the CLI was killed after ``units_done`` journaled units; False if it finished first (exit 0)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *args, "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = dest / JOURNAL_DIR / "done"
    try:
        while proc.poll() is None:
            if done.is_dir() and len(os.listdir(done)) >= units_done:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
    finally:
        proc.wait()
    if proc.returncode == 0:
        return False
    assert proc.returncode == -signal.SIGKILL, f"conversion failed: {proc.stderr.read().decode()[-2000:]}"
    return True


def assert_no_partial_files(dest: Path, reference: Path) -> None:
    ref = files(reference)
    for name, data in files(dest).items():
        assert data == ref[name], f"{name} differs from the finished file after the kill"


def test_hf_to_mcore_killed_twice_then_resumed(reference, tmp_path):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    dest = tmp_path / "mcore"
    first = rng.randint(1, LAYERS // 2)
    second = rng.randint(first + 1, LAYERS)
    print(f"seed {seed}: kills after {first} and {second} units")
    kill_after(["hf-to-mcore", str(reference["hf"]), str(dest)], dest, first)
    assert_no_partial_files(dest, reference["mcore"])
    assert not (dest / "metadata.json").exists()
    killed = kill_after(["hf-to-mcore", str(reference["hf"]), str(dest), "--resume"], dest, second)
    assert_no_partial_files(dest, reference["mcore"])
    if killed:
        convert_hf_to_mcore(reference["hf"], dest, HfToMcoreOptions(resume=True, progress=False))
    assert files(dest) == files(reference["mcore"])
    assert not (dest / JOURNAL_DIR).exists()


def test_mcore_to_hf_killed_then_resumed(reference, tmp_path):
    rng = random.Random()
    dest = tmp_path / "hf"
    shards = len(list(reference["hf_back"].glob("*.safetensors")))
    kill_after(["mcore-to-hf", str(reference["mcore"]), str(dest), "--max-shard-size", "1MiB"], dest,
               rng.randint(1, shards - 2))
    assert_no_partial_files(dest, reference["hf_back"])
    assert not (dest / "model.safetensors.index.json").exists()
    options = McoreToHfOptions(resume=True, progress=False, max_shard_bytes=1 << 20)
    convert_mcore_to_hf(reference["mcore"], dest, options)
    assert files(dest) == files(reference["hf_back"])


def test_resume_refuses_other_options(reference, tmp_path):
    dest = tmp_path / "mcore"
    kill_after(["hf-to-mcore", str(reference["hf"]), str(dest)], dest, 1)
    from vespo_megatron.convert.errors import ConversionError

    with pytest.raises(ConversionError, match="another source or other options"):
        convert_hf_to_mcore(reference["hf"], dest,
                            HfToMcoreOptions(resume=True, progress=False, per_layer_keys=True, ignore="x"))
