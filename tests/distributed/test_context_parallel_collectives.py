"""Collectives over the context-parallel group during one CP2 forward-backward of the whole model.

Every torch.distributed collective (and the names Megatron's mappings bound at import) is wrapped and recorded with
its tensor shape and whether its group is the CP group. Per micro-batch the CP group sees exactly: one all-gather of
K/V ([t, ng, 2·hn] per rank) per layer in the forward, one reduce-scatter of dK/dV per layer in the backward, and ONE
all-reduce of a [k, num_seqs] tensor from the loss (the per-sequence sums that complete logW) — nothing else.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import mappings

from tests.distributed.parallel_cases import initial_weights, make_samples, micro_batches
from vespo_megatron.megatron.loss import LossSettings
from vespo_megatron.hf_config import tiny_hf_config
from vespo_megatron.megatron.model import build_model
from vespo_megatron.megatron.parallel import init_parallel, spawn
from vespo_megatron.megatron.step import forward_backward, old_log_probs, wrap_ddp, zero_grads
from vespo_megatron.megatron.weights import load_global

FAMILY, DTYPE = "qwen3_moe", torch.float64
NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
         "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all", "all_to_all_single", "broadcast", "send",
         "recv", "isend", "irecv", "reduce", "gather", "scatter", "barrier")
KINDS = {"all_gather_into_tensor": "all_gather", "_all_gather_base": "all_gather",
         "reduce_scatter_tensor": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter"}


@contextlib.contextmanager
def recording(group: dist.ProcessGroup) -> Iterator[list[tuple[str, tuple, bool]]]:
    """Record (kind, shape of the first tensor argument, on ``group``) of every collective while active."""
    calls: list[tuple[str, tuple, bool]] = []
    originals = {name: getattr(dist, name) for name in NAMES if hasattr(dist, name)}
    bound = {"dist_all_gather_func": mappings.dist_all_gather_func,
             "dist_reduce_scatter_func": mappings.dist_reduce_scatter_func}

    def wrap(name, fn):
        signature = inspect.signature(fn)

        def call(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            # the input of gathers and scatters (what each rank contributes), else the first tensor
            tensor = arguments.get("input_tensor", arguments.get("input"))
            if not torch.is_tensor(tensor):
                tensor = next((v for v in arguments.values() if torch.is_tensor(v)), None)
            shape = tuple(tensor.shape) if tensor is not None else ()
            calls.append((KINDS.get(name, name), shape, arguments.get("group") is group))
            return fn(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    for attr, fn in bound.items():
        setattr(mappings, attr, wrap(fn.__name__, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        for attr, fn in bound.items():
            setattr(mappings, attr, fn)


def _rank(rank: int, weights: dict, samples: list, n_micros: tuple[int, ...]) -> list[dict]:
    init_parallel(cp=2)
    model = build_model(tiny_hf_config(FAMILY), dtype=DTYPE)
    load_global(model, weights)
    ddp = wrap_ddp(model)
    group = parallel_state.get_context_parallel_group()
    cp_rank = parallel_state.get_context_parallel_rank()
    out = []
    for n_micro in n_micros:
        zero_grads(ddp)
        mbs = micro_batches(samples, n_micro, 1, 0, 1, 0, 2, cp_rank)
        mbs = [mb.with_old_log_prob(o) for mb, o in zip(mbs, old_log_probs(ddp, mbs))]
        with recording(group) as calls:
            forward_backward(ddp, mbs, LossSettings(name="vespo"))
        out.append({"calls": calls, "num_seqs": [mb.num_seqs for mb in mbs], "tokens": [mb.tokens.numel() for mb in mbs],
                    "layers": model.config.num_layers, "kv_shape": (model.config.num_query_groups,
                                                                  2 * model.config.kv_channels)})
    return out


def _weights(rank: int) -> dict:
    init_parallel()
    return initial_weights(FAMILY, DTYPE)


@pytest.fixture(scope="module")
def runs():
    weights = spawn(_weights, 1)[0]
    return spawn(_rank, 2, weights, make_samples(8, seed=2), (1, 2))


@pytest.mark.parametrize("index", [0, 1], ids=["1-micro-batch", "2-micro-batches"])
def test_cp_group_collectives(runs, index):
    for rank_runs in runs:
        run = rank_runs[index]
        on_cp = [(kind, shape) for kind, shape, cp in run["calls"] if cp]
        n_micro, layers = len(run["num_seqs"]), run["layers"]
        reduces = [shape for kind, shape in on_cp if kind == "all_reduce"]
        assert len(reduces) == n_micro, on_cp
        for shape, num_seqs in zip(reduces, run["num_seqs"]):
            assert len(shape) == 2 and shape[1] == num_seqs and 1 <= shape[0] <= 8, (shape, num_seqs)
        gathers = [shape for kind, shape in on_cp if kind == "all_gather"]
        scatters = [shape for kind, shape in on_cp if kind == "reduce_scatter"]
        assert len(gathers) == len(scatters) == layers * n_micro, on_cp
        assert sorted(set(gathers)) == sorted({(t,) + run["kv_shape"] for t in run["tokens"]}), gathers
        assert sorted(set(scatters)) == sorted({(2 * t,) + run["kv_shape"] for t in run["tokens"]}), scatters
        others = [c for c in on_cp if c[0] not in ("all_reduce", "all_gather", "reduce_scatter")]
        assert others == []
