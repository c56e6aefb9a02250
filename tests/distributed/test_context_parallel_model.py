"""Context parallelism through the whole model (local spec, no Transformer Engine) against the 1-rank run.

The same global weights (fp64) and the same samples go through the 1-rank model and through CP2, CP2·EP2 (2 ranks),
CP2·TP2 with sequence parallelism and CP2·PP2 (4 ranks), with 1 and 2 micro-batches. Every sequence is padded to a
multiple of 2·cp and cut into the zig-zag chunks by the packer; the attention gathers K/V over the CP group. The loss
(sum of the CP shares), the per-token log-probs (gathered over CP and unsharded by the packer's inverse) and every
gradient equal the 1-rank run's to 1e-10. Sequence lengths are odd and even, several shorter than 2·cp = 4.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.parallel_cases import make_samples, run_layout, weights_rank
from vespo_megatron.megatron.parallel import init_parallel, spawn

FAMILY, DTYPE, TOL = "qwen3_moe", torch.float64, 1e-10
N_MICROS = (1, 2)
# (prompt, response): total lengths 2, 3, 4, 5, 7, 8, 11, 14, 1 + 2 = 3
LENGTHS = [(1, 1), (2, 1), (3, 1), (2, 3), (4, 3), (3, 5), (5, 6), (6, 8), (1, 2)]


@pytest.fixture(scope="module")
def setup():
    weights = spawn(weights_rank, 1, FAMILY, DTYPE)[0]
    samples = make_samples(len(LENGTHS), seed=5, lengths=LENGTHS)
    reference = spawn(run_layout, 1, {}, FAMILY, DTYPE, weights, samples, N_MICROS)[0]
    return weights, samples, reference


def _check(results: list[list[dict]], reference: list[dict], n_samples: int) -> None:
    for i, ref in enumerate(reference):
        reporting = [r[i] for r in results if r[i]["report"]]
        loss = sum(r["loss"] for r in reporting)
        assert abs(loss - ref["loss"]) <= TOL * max(1.0, abs(ref["loss"])), (N_MICROS[i], loss, ref["loss"])
        for r in reporting:  # every CP rank holds the whole unsharded log-probs of its micro-batches
            assert sorted(r["logp"]) == sorted({sid for q in reporting for sid in q["logp"]})
        logp = {sid: lp for r in reporting for sid, lp in r["logp"].items()}
        assert sorted(logp) == sorted(ref["logp"]) == list(range(n_samples))
        for sid, lp in ref["logp"].items():
            assert logp[sid].shape == lp.shape and torch.allclose(logp[sid], lp, atol=TOL, rtol=0), (N_MICROS[i], sid)
        grads = results[0][i]["grads"]
        assert sorted(grads) == sorted(ref["grads"])
        for key, g in ref["grads"].items():
            assert torch.allclose(grads[key], g, atol=TOL, rtol=0), (N_MICROS[i], key, (grads[key] - g).abs().max())


def test_reference_is_not_trivial(setup):
    _, samples, reference = setup
    lengths = [len(s.prompt) + len(s.response) for s in samples]
    assert any(n < 4 for n in lengths) and any(n % 2 for n in lengths) and any(n % 2 == 0 for n in lengths)
    for ref in reference:
        assert ref["loss"] != 0.0
        assert all(v.abs().max() > 0 for k, v in ref["grads"].items() if "linear_qkv" in k)


@pytest.mark.parametrize("layout", [dict(cp=2), dict(cp=2, ep=2)], ids=["cp2", "cp2-ep2"])
def test_two_rank_layouts_match_one_rank(setup, layout):
    weights, samples, reference = setup
    results = spawn(run_layout, 2, layout, FAMILY, DTYPE, weights, samples, N_MICROS)
    _check(results, reference, len(samples))


@pytest.mark.parametrize("layout", [dict(cp=2, tp=2), dict(cp=2, pp=2)], ids=["cp2-tp2-sp", "cp2-pp2"])
def test_four_rank_layouts_match_one_rank(setup, layout):
    weights, samples, reference = setup
    results = spawn(run_layout, 4, layout, FAMILY, DTYPE, weights, samples, N_MICROS)
    _check(results, reference, len(samples))


def _attention_checks(rank: int) -> dict:
    """2 ranks, cp = 2, the attention module alone: (a) sbhd input (Megatron's unpacked CP layout) against plain
    causal attention of the whole sequence, outputs and input gradients of this rank's zig-zag rows (fp64);
    (b) the errors for packed segments that are not multiples of 2·cp."""
    import torch.nn.functional as F
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from vespo_megatron.hf_config import tiny_hf_config
    from vespo_megatron.megatron.layers import PackedDotProductAttention
    from vespo_megatron.megatron.model import transformer_config

    init_parallel(cp=2)
    attention = PackedDotProductAttention(transformer_config(tiny_hf_config(FAMILY)), 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(0)
    s, b, c = 12, 2, 3  # whole sequence of 12 = 4 chunks of 3; rank r holds chunks r and 3 − r
    full = [torch.randn(s, b, n, 16, generator=gen, dtype=torch.float64, requires_grad=True) for n in (4, 2, 2)]
    weight = torch.randn(s, b, 64, generator=gen, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in full), is_causal=True,
                                         scale=attention.softmax_scale, enable_gqa=True)
    ref = ref.permute(2, 0, 1, 3).reshape(s, b, -1)
    (ref * weight).sum().backward()
    rows = torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((3 - rank) * c, (4 - rank) * c)])
    local = [x.detach()[rows].clone().requires_grad_() for x in full]
    out = attention(*local, None)
    (out * weight[rows]).sum().backward()
    errs = {"out": (out - ref.detach()[rows]).abs().max().item()}
    errs.update({f"grad{i}": (x.grad - f.grad[rows]).abs().max().item() for i, (x, f) in enumerate(zip(local, full))})
    q, kv = torch.zeros(4, 4, 16), torch.zeros(4, 2, 16)
    errors = []
    for cu in ([0, 6, 8], [0, 4]):
        cu = torch.tensor(cu, dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                                 cu_seqlens_kv_padded=cu, max_seqlen_q=8, max_seqlen_kv=8)
        try:
            attention(q, kv, kv, None, packed_seq_params=params)
        except ValueError as err:
            errors.append(str(err))
    return {"errs": errs, "errors": errors}


@pytest.fixture(scope="module")
def attention_checks():
    return spawn(_attention_checks, 2)


def test_unpacked_cp_attention_matches_whole_sequence(attention_checks):
    for result in attention_checks:
        assert set(result["errs"]) == {"out", "grad0", "grad1", "grad2"}
        assert all(err <= 1e-12 for err in result["errs"].values()), result["errs"]


def test_segments_not_multiple_of_two_cp_fail_clearly(attention_checks):
    for result in attention_checks:
        errors = result["errors"]
        assert len(errors) == 2
        assert "cu_seqlens_q_padded [0, 6, 8] must be multiples of 2·cp = 4" in errors[0]
        assert "tail pad must be a segment" in errors[1]
