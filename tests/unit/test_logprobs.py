"""vocab_parallel_logprobs on one rank against a plain torch reference.

Reference for logits z [t, C] with real vocabulary V ≤ C and labels y [t]:
    logp_t = log_softmax(z[:, :V])_{t, y_t},   H_t = −Σ_v p_tv log p_tv,
and its autograd gradients. Checked in fp64 to 1e-12 over chunk sizes, vocabulary padding and in-place backward;
fp32/bf16 logits against an fp64 reference of the same (rounded) values; padding columns get exactly zero gradient;
bad shapes and vocabulary sizes raise ValueError.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from vespo_megatron.megatron.logprobs import vocab_parallel_logprobs

TOL = 1e-12
BIG = 1 << 22


def make_case(t: int, cols: int, vocab: int, dtype: torch.dtype = torch.float64,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [t, cols] (scale 3, padding columns filled with +50 so that including them would show), labels [t]."""
    gen = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(t, cols, generator=gen, dtype=torch.float64)
    z[:, vocab:] = 50.0
    labels = torch.randint(0, vocab, (t,), generator=gen)
    return z.to(dtype), labels


def reference(z: torch.Tensor, labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logp [t], entropy [t] from log_softmax over the first ``vocab`` columns."""
    lp = torch.log_softmax(z[:, :vocab], dim=-1)
    return lp.gather(1, labels[:, None])[:, 0], -(lp.exp() * lp).sum(-1)


def grads(fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], z: torch.Tensor, a: torch.Tensor,
          b: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, H, ∂/∂z Σ_t a_t·logp_t + b_t·H_t) of ``fn(logits)``; with ``inplace`` the logits are a clone of z."""
    leaf = z.detach().clone().requires_grad_()
    logits = leaf.clone() if inplace else leaf
    logp, entropy = fn(logits)
    (a * logp + b * entropy).sum().backward()
    return logp.detach(), entropy.detach(), leaf.grad


def coefficients(t: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t, generator=gen, dtype=torch.float64), torch.randn(t, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("chunk_elems", [1, 7, 40, BIG])
@pytest.mark.parametrize("cols,vocab", [(11, 11), (11, 8), (11, 1)], ids=["no-pad", "pad", "one-real-column"])
def test_fp64_matches_reference(cols, vocab, chunk_elems, inplace):
    t = 13
    z, labels = make_case(t, cols, vocab)
    a, b = coefficients(t)
    vocab_size = None if vocab == cols else vocab
    got = grads(lambda x: vocab_parallel_logprobs(
        x, labels, vocab_size=vocab_size, chunk_elems=chunk_elems, inplace_backward=inplace), z, a, b, inplace)
    want = grads(lambda x: reference(x, labels, vocab), z, a, b)
    for g, w, name in zip(got, want, ("logp", "entropy", "grad")):
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g, w, atol=TOL, rtol=0, msg=name)
    assert torch.all(got[2][:, vocab:] == 0)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_single_output_gradients(inplace):
    """Only logp or only H enters the loss (the other output gets no gradient)."""
    z, labels = make_case(9, 10, 7)
    for pick in (0, 1):
        leaf = z.clone().requires_grad_()
        leaf_ref = z.clone().requires_grad_()
        logits = leaf.clone() if inplace else leaf
        vocab_parallel_logprobs(logits, labels, vocab_size=7, chunk_elems=20, inplace_backward=inplace)[pick].sum().backward()
        reference(leaf_ref, labels, 7)[pick].sum().backward()
        torch.testing.assert_close(leaf.grad, leaf_ref.grad, atol=TOL, rtol=0)


def test_large_logit_offsets_are_stable():
    """Rows shifted by ±1e4 (exp would overflow without the max shift) still match the reference."""
    z, labels = make_case(6, 12, 10)
    z += torch.tensor([1e4, -1e4, 0.0, 300.0, -300.0, 0.0], dtype=torch.float64)[:, None]
    a, b = coefficients(6)
    got = grads(lambda x: vocab_parallel_logprobs(x, labels, vocab_size=10, chunk_elems=24), z, a, b)
    want = grads(lambda x: reference(x, labels, 10), z, a, b)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-9, rtol=0)


def test_hand_computed_values():
    """Uniform row over V=4 (label 2): logp = −log 4, H = log 4, ∂logp/∂z = e_2 − 1/4, ∂H/∂z = 0.
    Row (0, log 3) over V=2 (label 1): p = (1/4, 3/4), logp = log 3/4, H = log 4 − (3/4)·log 3,
    ∂H/∂z = −p ⊙ (z − E_p z) = (3/16, −3/16)·log 3."""
    log3, log4 = torch.tensor(3.0, dtype=torch.float64).log(), torch.tensor(4.0, dtype=torch.float64).log()
    uniform = torch.tensor([[0.0, 0.0, 0.0, 0.0, 9.0]], dtype=torch.float64, requires_grad=True)
    logp, entropy = vocab_parallel_logprobs(uniform, torch.tensor([2]), vocab_size=4)
    torch.testing.assert_close(torch.stack([logp[0], entropy[0]]), torch.stack([-log4, log4]), atol=TOL, rtol=0)
    logp.sum().backward()
    assert uniform.grad.tolist() == [[-0.25, -0.25, 0.75, -0.25, 0.0]]

    two = torch.tensor([[0.0, log3.item(), -9.0]], dtype=torch.float64, requires_grad=True)
    logp, entropy = vocab_parallel_logprobs(two, torch.tensor([1]), vocab_size=2)
    torch.testing.assert_close(logp[0], torch.tensor(0.75, dtype=torch.float64).log(), atol=TOL, rtol=0)
    torch.testing.assert_close(entropy[0], log4 - 0.75 * log3, atol=TOL, rtol=0)
    entropy.sum().backward()
    torch.testing.assert_close(two.grad, torch.stack([3 / 16 * log3, -3 / 16 * log3, log3 * 0])[None], atol=TOL, rtol=0)


def test_gradcheck():
    z, labels = make_case(4, 6, 5)
    fn = lambda x: vocab_parallel_logprobs(x, labels, vocab_size=5, chunk_elems=12)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z.requires_grad_(),), eps=1e-6, atol=1e-8)


def test_inplace_backward_cannot_run_twice():
    """The in-place backward overwrites the saved logits: a second backward must fail, not return wrong gradients."""
    z, labels = make_case(4, 6, 6)
    logits = z.requires_grad_().clone()
    logp, _ = vocab_parallel_logprobs(logits, labels, inplace_backward=True)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


@pytest.mark.parametrize("dtype,atol,grad_rtol", [(torch.float32, 2e-5, 1e-5), (torch.bfloat16, 2e-5, 1e-2)])
def test_low_precision_logits(dtype, atol, grad_rtol):
    """fp32/bf16 logits: fp32 outputs (accumulated in fp32) close to fp64 on the same rounded values; grad in dtype."""
    t, vocab = 16, 1000
    z, labels = make_case(t, 1024, vocab, dtype=dtype)
    a, b = coefficients(t)
    leaf = z.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(leaf, labels, vocab_size=vocab, chunk_elems=3000)
    assert logp.dtype == entropy.dtype == torch.float32
    (a.float() * logp + b.float() * entropy).sum().backward()
    assert leaf.grad.dtype == dtype
    want = grads(lambda x: reference(x, labels, vocab), z.double(), a, b)
    torch.testing.assert_close(logp.double(), want[0], atol=atol, rtol=0)
    torch.testing.assert_close(entropy.double(), want[1], atol=atol, rtol=0)
    scale = want[2].abs().max()
    torch.testing.assert_close(leaf.grad.double(), want[2], atol=grad_rtol * scale, rtol=grad_rtol)
    assert torch.all(leaf.grad[:, vocab:] == 0)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_padding_columns_are_ignored_and_get_zero_grad(inplace):
    """NaN in the padding columns changes nothing, and their gradient is exactly 0 (also when written in place)."""
    z, labels = make_case(7, 9, 6)
    a, b = coefficients(7)
    z[:, 6:] = float("nan")
    got = grads(lambda x: vocab_parallel_logprobs(x, labels, vocab_size=6, chunk_elems=13, inplace_backward=inplace),
                z, a, b, inplace)
    want = grads(lambda x: reference(x, labels, 6), z, a, b)
    assert torch.equal(got[2][:, 6:], torch.zeros(7, 3, dtype=torch.float64))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=TOL, rtol=0)


def test_inplace_backward_reuses_logits_storage_and_copy_leaves_them():
    z, labels = make_case(5, 8, 8)
    seen: list[torch.Tensor] = []
    for inplace in (True, False):
        leaf = z.clone().requires_grad_()
        logits = leaf.clone()
        logits.register_hook(seen.append)
        vocab_parallel_logprobs(logits, labels, inplace_backward=inplace)[0].sum().backward()
        assert (seen[-1].data_ptr() == logits.data_ptr()) is inplace
        assert torch.equal(logits, z) is not inplace


def test_int32_labels_and_empty_batch():
    z, labels = make_case(6, 7, 7)
    torch.testing.assert_close(vocab_parallel_logprobs(z, labels.int())[0], reference(z, labels, 7)[0],
                               atol=TOL, rtol=0)
    empty = torch.zeros(0, 7, dtype=torch.float64, requires_grad=True)
    logp, entropy = vocab_parallel_logprobs(empty, torch.zeros(0, dtype=torch.long))
    (logp.sum() + entropy.sum()).backward()
    assert logp.shape == entropy.shape == (0,) and empty.grad.shape == (0, 7)


@pytest.mark.parametrize(
    "logits_shape,labels_shape,vocab_size,match",
    [
        ((5,), (5,), None, r"logits must be \[t, V/tp\].*got \(5,\)"),
        ((1, 5, 7), (5,), None, r"logits must be \[t, V/tp\].*got \(1, 5, 7\)"),
        ((5, 7), (6,), None, r"labels \[t\].*\(5, 7\) and \(6,\)"),
        ((5, 7), (5, 1), None, r"labels \[t\].*\(5, 7\) and \(5, 1\)"),
        ((5, 7), (5,), 8, r"vocab_size 8 does not fit 1 shards of 7 columns"),
        ((5, 7), (5,), 0, r"vocab_size 0 does not fit 1 shards of 7 columns"),
        ((5, 7), (5,), -3, r"vocab_size -3 does not fit"),
    ],
    ids=["1d", "3d", "labels-length", "labels-2d", "vocab-too-big", "vocab-zero", "vocab-negative"],
)
def test_bad_inputs(logits_shape, labels_shape, vocab_size, match):
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs(torch.zeros(logits_shape), torch.zeros(labels_shape, dtype=torch.long),
                                vocab_size=vocab_size)


@pytest.mark.parametrize("labels", [[0, 4, 1], [0, -100, 1], [3, 0, 0]])
def test_labels_outside_the_vocabulary_are_rejected(labels):
    with pytest.raises(ValueError, match=r"labels\[\d\]=-?\d+ outside \[0, 3\)"):
        vocab_parallel_logprobs(torch.randn(3, 5), torch.tensor(labels), vocab_size=3)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature_scores_logits_over_temperature(temperature, inplace):
    """log-probs, entropy and the logits gradient of logits / τ, the way the rollout engine samples."""
    t = 9
    z, labels = make_case(t, 11, 8)
    a, b = coefficients(t)
    got = grads(lambda x: vocab_parallel_logprobs(x, labels, vocab_size=8, chunk_elems=7, inplace_backward=inplace,
                                                  temperature=temperature), z, a, b, inplace)
    want = grads(lambda x: reference(x / temperature, labels, 8), z, a, b)
    for g, w, name in zip(got, want, ("logp", "entropy", "grad")):
        torch.testing.assert_close(g, w, atol=TOL, rtol=0, msg=name)


def test_temperature_must_be_positive():
    z, labels = make_case(3, 4, 4)
    with pytest.raises(ValueError, match="temperature: must be > 0"):
        vocab_parallel_logprobs(z, labels, temperature=0.0)
