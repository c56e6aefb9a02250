"""The weight-update group: our opener pairs with the path SGLang's engine takes (rendezvous + PrefixStore(group_name)
+ torch's ``_new_process_group_helper``, run in a child process), buckets hold at most one bucket + one tensor, and
shards are written bounded and indexed."""
from __future__ import annotations

import json
import multiprocessing as mp

import pytest
import torch

from vespo_megatron.rollout.weight_group import open_group, receive_tensors
from vespo_megatron.rollout.weight_sync import buckets, free_port, nbytes, write_index, write_shards

pytestmark = pytest.mark.timeout(300)
NAMES, DTYPES, SHAPES = ["a", "b", "c"], ["float32", "bfloat16", "int64"], [[3, 4], [5], [2, 2]]


def _sent() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(3, 4), torch.randn(5).to(torch.bfloat16), torch.arange(4).reshape(2, 2)]


def _engine_side(port: int, results: mp.Queue) -> None:
    """What SGLang's weight updater does (utils/common.py init_custom_process_group), as rank 1."""
    import datetime

    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = datetime.timedelta(seconds=120)
    store, rank, world = next(rendezvous(f"tcp://127.0.0.1:{port}", 1, 2, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world, rank, [], Backend("gloo"), PrefixStore("weight_update_group", store),
                                         group_name="weight_update_group", backend_options=None, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world)}
    got = []
    for dtype, shape in zip(DTYPES, SHAPES):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        torch.distributed.broadcast(tensor, src=0, group=group)
        got.append(tensor)
    results.put([(str(t.dtype), t.float().tolist()) for t in got])  # plain data: the child exits right after


def test_our_group_pairs_with_the_engines_process_group_helper():
    port = free_port("127.0.0.1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_engine_side, args=(port, results))
    child.start()
    group = open_group("127.0.0.1", port, 0, 2, "weight_update_group", "gloo", timeout_s=120)
    for tensor in _sent():
        group.broadcast(tensor)
    got = results.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    for want, (dtype, values) in zip(_sent(), got, strict=True):
        assert str(want.dtype) == dtype and want.float().tolist() == values
    group.close()


def test_receive_tensors_in_process_and_bad_requests():
    port = free_port("127.0.0.1")
    box = {}

    def engine() -> None:
        box["got"] = receive_tensors(open_group("127.0.0.1", port, 1, 2, "g", "gloo", 120), NAMES, DTYPES, SHAPES)

    import threading

    thread = threading.Thread(target=engine)
    thread.start()
    trainer = open_group("127.0.0.1", port, 0, 2, "g", "gloo", 120)
    for tensor in _sent():
        trainer.broadcast(tensor)
    thread.join()
    assert [name for name, _ in box["got"]] == NAMES
    assert all(torch.equal(a, b) for a, (_, b) in zip(_sent(), box["got"]))
    with pytest.raises(ValueError, match="names, dtypes and shapes differ in length"):
        receive_tensors(trainer, NAMES, DTYPES[:1], SHAPES)
    with pytest.raises(ValueError, match="weight 'a': unknown dtype 'float99'"):
        receive_tensors(trainer, ["a"], ["float99"], [[1]])
    with pytest.raises(ValueError, match="backend must be one of"):
        open_group("127.0.0.1", port, 0, 2, "g", "mpi")
    with pytest.raises(ValueError, match="rank 2 outside the group of world_size 2"):
        open_group("127.0.0.1", port, 2, 2, "g", "gloo")


@pytest.mark.parametrize("sizes, bucket_bytes", [([4, 4, 4, 4], 8), ([10, 1, 1, 30, 2], 12), ([1], 4), ([], 4)])
def test_buckets_are_bounded_and_look_ahead_one_tensor(sizes, bucket_bytes):
    produced = []

    def stream():
        for i, size in enumerate(sizes):
            produced.append(i)
            yield f"t{i}", torch.zeros(size, dtype=torch.uint8)

    seen = 0
    out = []
    for bucket, last in buckets(stream(), bucket_bytes):
        seen += len(bucket)
        held = len(produced) - (seen - len(bucket))  # tensors produced and not yet sent before this bucket
        assert held <= len(bucket) + 1  # this bucket + the one tensor looked ahead
        assert len(bucket) == 1 or sum(nbytes(t) for _, t in bucket) <= bucket_bytes
        assert last == (seen == len(sizes))
        out += [name for name, _ in bucket]
    assert out == [f"t{i}" for i in range(len(sizes))]
    with pytest.raises(ValueError, match="bucket_bytes must be > 0"):
        list(buckets(stream(), 0))


def test_shards_are_bounded_and_indexed(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from vespo_megatron.hf_config import tiny_hf_config

    config = tiny_hf_config("qwen3_moe")
    model = AutoModelForCausalLM.from_config(config)
    named = list(model.state_dict().items())
    half = len(named) // 2
    weight_map = write_shards(named[:half], tmp_path, "model-rank00000", 50_000)
    weight_map |= write_shards(named[half:], tmp_path, "model-rank00001", 50_000)  # as a second owning rank would
    write_index(tmp_path, weight_map, config)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(nbytes(t) for _, t in named)
    files = sorted(set(index["weight_map"].values()))
    assert {f.split("-")[1] for f in files} == {"rank00000", "rank00001"} and len(files) > 2
    for filename in files:
        tensors = load_file(tmp_path / filename)
        assert len(tensors) == 1 or sum(nbytes(t) for t in tensors.values()) <= 50_000
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in named)
