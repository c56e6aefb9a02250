"""Kill-resume of training: SIGKILL one rank of a running `vespo-megatron train` job mid-run, then resume with --load.

* The launcher stops the whole job and says which rank died and by which signal (exit status 1, one line).
* ``--load`` resumes from the last complete checkpoint (``latest``: written only after every rank's part of a save,
  so a kill during a save leaves the previous checkpoint).
* Synchronous mode: every step after the resumed iteration equals the uninterrupted run's step bit for bit (loss,
  gradient norm, reward, VESPO statistics, learning rate): weights, optimizer state, RNG, the lr schedule position and
  the prompt order are restored exactly.
* Asynchronous mode: batches are generated ahead by a producer thread, at most --max-lag versions behind, so the
  uninterrupted run's batch for iteration j may have been generated at version j − 1 while a resumed run generates
  it at version j (its producer starts with the restored weights): the uninterrupted run is NOT reproduced step for
  step. What is guaranteed and tested: the resumed run continues at the checkpoint's iteration with the next unseen
  prompts, its first step is a function of the checkpoint alone (two resumes give bit-identical metrics) with policy
  lag 0, and every later step keeps the lag within --max-lag.

The weights reach the in-process CPU engine by disk here: with the distributed weight sync that engine (a thread of
the launcher) waits in a gloo broadcast when a rank dies mid-sync and the launcher exits only at that group's
timeout (300 s); a real SGLang server is a process of its own.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from vespo_megatron.hf_config import load_hf_config, tiny_hf_config
from vespo_megatron.train import checkpoint
from vespo_megatron.train.config import TrainConfig
from vespo_megatron.train.run import run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ITERS = 5
COMPARED = ("loss", "grad_norm", "reward_mean", "entropy", "lr", "vespo/w_seq_mean", "response_len_mean")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_hf_config("qwen3_moe", vocab_size=12)).save_pretrained(path)
    return str(path)


def _settings(hf_dir: str, async_rollout: bool) -> dict:
    return dict(hf_checkpoint=hf_dir, rollout_batch_size=4, n_samples_per_prompt=2, num_mini_batches=2,
                micro_batch_size=2, max_new_tokens=4, train_iters=ITERS, engine_dtype="fp32", temperature=2.0,
                routing_replay="off" if async_rollout else "r3", async_rollout=async_rollout, max_lag=1,
                weight_sync="disk")


def _argv(settings: dict, **extra) -> list[str]:
    argv = []
    for key, value in {**settings, **extra}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


def _children(pid: int) -> list[int]:
    """Rank processes (multiprocessing spawn children) of ``pid``, in start order (= rank order)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _latest(ckpt: Path, hf_dir: str) -> dict:
    """Meta of the last complete checkpoint (iteration, policy version), through the checkpoint module (format-free);
    {"iteration": 0} before the first."""
    try:
        return checkpoint.check_compatible(ckpt, load_hf_config(hf_dir))
    except FileNotFoundError:
        return {"iteration": 0}


def _kill_a_rank_mid_run(settings: dict, work: Path) -> tuple[int, str]:
    """Start the CLI job (2 ranks, a checkpoint every step); once iteration 2 is saved, wait into the next step and
    SIGKILL rank 1 (wherever it is: a kill during a save is covered too, ``latest`` then names the previous
    checkpoint). Returns the job's exit status and stderr."""
    ckpt = work / "ckpt"
    argv = _argv(settings, save=str(ckpt), save_interval=1, tensorboard_dir=str(work / "tb"), nproc=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "vespo_megatron.cli", "train", *argv], stderr=subprocess.PIPE,
                           stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 600
        while _latest(ckpt, settings["hf_checkpoint"])["iteration"] < 2:
            assert job.poll() is None, job.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint of iteration 2 within 600 s"
            time.sleep(0.05)
        time.sleep(0.3)  # into the next step
        ranks = _children(job.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    return job.returncode, stderr


def _assert_stopped_clearly(status: int, stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("vespo-megatron train: error:")]
    assert status == 1, stderr
    assert lines and "rank 1 was killed by signal SIGKILL" in lines[0], stderr


def test_sync_resume_after_sigkill_reproduces_the_uninterrupted_run(hf_dir, tmp_path):
    settings = _settings(hf_dir, async_rollout=False)
    status, stderr = _kill_a_rank_mid_run(settings, tmp_path)
    _assert_stopped_clearly(status, stderr)
    resumed_at = _latest(tmp_path / "ckpt", hf_dir)["iteration"]
    assert 2 <= resumed_at < ITERS
    full = run_training(TrainConfig(**settings), world_size=2, quiet=True)
    resumed = run_training(TrainConfig(**settings, load=str(tmp_path / "ckpt")), world_size=2, quiet=True)
    assert [it for it, _ in resumed] == list(range(resumed_at, ITERS))
    for (it, got), (_, want) in zip(resumed, full[resumed_at:]):
        for key in COMPARED:
            assert got[key] == want[key], (it, key, got[key], want[key])  # bit for bit
    assert full[-1][1]["grad_norm"] > 0 and full[-1][1]["loss"] != full[-2][1]["loss"]


def test_async_resume_after_sigkill_continues_within_the_lag_bound(hf_dir, tmp_path):
    settings = _settings(hf_dir, async_rollout=True)
    status, stderr = _kill_a_rank_mid_run(settings, tmp_path)
    _assert_stopped_clearly(status, stderr)
    meta = _latest(tmp_path / "ckpt", hf_dir)
    resumed_at = meta["iteration"]
    assert 2 <= resumed_at < ITERS and meta["version"] == resumed_at
    again = tmp_path / "copy"
    shutil.copytree(tmp_path / "ckpt", again)  # the same checkpoint, resumed twice
    first = run_training(TrainConfig(**settings, load=str(tmp_path / "ckpt")), world_size=2, quiet=True)
    second = run_training(TrainConfig(**{**settings, "train_iters": resumed_at + 1}, load=str(again)), world_size=2,
                          quiet=True)
    assert [it for it, _ in first] == list(range(resumed_at, ITERS)) and [it for it, _ in second] == [resumed_at]
    assert first[0][1]["policy_lag"] == second[0][1]["policy_lag"] == 0
    for key in COMPARED:
        assert first[0][1][key] == second[0][1][key], key
    assert all(0 <= m["policy_lag"] <= 1 for _, m in first)
