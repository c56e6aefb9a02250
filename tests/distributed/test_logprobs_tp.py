"""vocab_parallel_logprobs over a TP=2 gloo group equals the 1-rank full-vocabulary run (fp64, 1e-12).

Each rank holds its half [t, C/2] of the logits [t, C]; the real vocabulary V ≤ C may end inside the last shard
(padding) or leave it a single real column. Compared: logp [t], entropy [t] (identical on both ranks) and the
gradient of Σ_t a_t·logp_t + b_t·H_t on each shard, concatenated over the ranks. One spawn runs every case.
"""
from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state

from tests.unit.test_logprobs import coefficients, grads, make_case, reference
from vespo_megatron.megatron.logprobs import vocab_parallel_logprobs
from vespo_megatron.megatron.parallel import init_parallel, spawn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOL, T, COLS = 1e-12, 11, 14
CASES = [  # (name, vocab_size or None, chunk_elems, inplace)
    ("no-pad", None, 1 << 22, False),
    ("no-pad-chunked-inplace", None, 15, True),
    ("pad-in-last-shard", 11, 1 << 22, True),
    ("pad-in-last-shard-chunked", 11, 7, False),
    ("one-real-column-on-last-shard", 8, 16, True),
]
BAD_VOCAB = (COLS // 2, COLS + 1)  # the last shard would be all padding / the vocabulary overflows the shards


def case_inputs(index: int):
    """(logits [T, COLS], labels [T], a [T], b [T]) of case ``index``; labels fall on both shards."""
    _, vocab, _, _ = CASES[index]
    vocab = vocab or COLS
    z, labels = make_case(T, COLS, vocab, seed=index)
    labels[:2] = torch.tensor([0, vocab - 1])
    return z, labels, *coefficients(T, seed=100 + index)


def run_cases(rank: int) -> tuple[list[dict], list[str]]:
    """Per case: this rank's logp, entropy and shard gradient; then the errors for vocab sizes that do not fit."""
    init_parallel(tp=2)
    group = parallel_state.get_tensor_model_parallel_group()
    assert parallel_state.get_tensor_model_parallel_rank() == rank
    out = []
    for index, (_, vocab, chunk_elems, inplace) in enumerate(CASES):
        z, labels, a, b = case_inputs(index)
        shard = z.chunk(2, dim=1)[rank]
        logp, entropy, grad = grads(lambda x: vocab_parallel_logprobs(
            x, labels, vocab_size=vocab, group=group, chunk_elems=chunk_elems, inplace_backward=inplace),
            shard, a, b, inplace)
        out.append(dict(logp=logp, entropy=entropy, grad=grad))
    errors = []
    for vocab in BAD_VOCAB:
        try:
            vocab_parallel_logprobs(torch.zeros(T, COLS // 2), torch.zeros(T, dtype=torch.long), vocab_size=vocab,
                                    group=group)
        except ValueError as err:
            errors.append(str(err))
    return out, errors


@pytest.fixture(scope="module")
def spawned() -> list[tuple[list[dict], list[str]]]:
    return spawn(run_cases, 2)


@pytest.fixture(scope="module")
def per_rank(spawned) -> list[list[dict]]:
    return [cases for cases, _ in spawned]


def test_vocab_size_that_does_not_fit_two_shards_raises(spawned):
    for _, errors in spawned:
        assert errors == [f"vocab_size {v} does not fit 2 shards of {COLS // 2} columns" for v in BAD_VOCAB]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_tp2_matches_one_rank(per_rank, index):
    _, vocab, chunk_elems, inplace = CASES[index]
    z, labels, a, b = case_inputs(index)
    one_rank = grads(lambda x: vocab_parallel_logprobs(
        x, labels, vocab_size=vocab, chunk_elems=chunk_elems, inplace_backward=inplace), z, a, b, inplace)
    plain = grads(lambda x: reference(x, labels, vocab or COLS), z, a, b)
    r0, r1 = per_rank[0][index], per_rank[1][index]
    for key, ref, ref_plain in zip(("logp", "entropy"), one_rank[:2], plain[:2]):
        for r in (r0, r1):
            torch.testing.assert_close(r[key], ref, atol=TOL, rtol=0, msg=key)
        torch.testing.assert_close(ref, ref_plain, atol=TOL, rtol=0, msg=key)
    grad = torch.cat([r0["grad"], r1["grad"]], dim=1)
    torch.testing.assert_close(grad, one_rank[2], atol=TOL, rtol=0)
    torch.testing.assert_close(grad, plain[2], atol=TOL, rtol=0)
    assert torch.all(grad[:, vocab or COLS:] == 0)
    assert grad.abs().amin(dim=0)[: vocab or COLS].gt(0).all()  # every real column gets gradient
