"""The background producer of the HF -> Megatron writer: order, error hand-over, early stop without a hang."""
from __future__ import annotations

import threading

import pytest

from vespo_megatron.convert.hf_to_mcore import prefetched


def test_items_come_in_order():
    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))


def test_producer_error_is_raised_in_the_consumer():
    def items():
        yield 1
        raise ValueError("bad tensor in shard 3")

    got = []
    with pytest.raises(ValueError, match="bad tensor in shard 3"):
        for item in prefetched(items()):
            got.append(item)
    assert got == [1]


def test_consumer_stopping_early_ends_the_producer():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    before = threading.active_count()
    stream = prefetched(items(), depth=1)
    assert next(stream) == 0
    stream.close()
    assert threading.active_count() == before and len(produced) < 10
