"""The gloo launcher: results in rank order, a failing rank's traceback, a rank that dies is noticed at once."""
from __future__ import annotations

import os
import time

import pytest
import torch.distributed as dist

from vespo_megatron.megatron.parallel import spawn


def _sum_of_ranks(rank: int, scale: int) -> tuple[int, int]:
    import torch

    value = torch.tensor([rank * scale])
    dist.all_reduce(value)
    return rank, int(value)


def _one_rank_raises(rank: int) -> int:
    if rank == 1:
        raise ValueError("bad shard on rank 1")
    return rank


def _one_rank_dies(rank: int) -> int:
    if rank == 1:
        os._exit(3)
    time.sleep(60)
    return rank


def test_results_in_rank_order_and_collectives_work():
    assert spawn(_sum_of_ranks, 3, 10) == [(0, 30), (1, 30), (2, 30)]


def test_a_failing_rank_reports_its_traceback():
    with pytest.raises(RuntimeError, match="rank 1 failed:(.|\n)*ValueError: bad shard on rank 1"):
        spawn(_one_rank_raises, 2)


@pytest.mark.timeout(300)  # without the exit-code check spawn would wait its full 600 s timeout (a loaded machine may be slow)
def test_a_dead_rank_is_noticed_without_waiting_for_the_timeout():
    with pytest.raises(RuntimeError, match="rank 1 died with exit code 3"):
        spawn(_one_rank_dies, 2, timeout=600)


def _one_rank_killed_in_a_collective(rank: int) -> int:
    import signal

    import torch

    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(1))  # rank 0 waits for the dead rank: its failure must not hide the cause
    return rank


@pytest.mark.timeout(300)
def test_a_killed_rank_is_named_with_its_signal():
    with pytest.raises(RuntimeError, match=r"^rank 1 was killed by signal SIGKILL; the job is stopped"):
        spawn(_one_rank_killed_in_a_collective, 2, timeout=600)
