"""slime's custom-loss hook with VESPO: 2 gloo ranks with CP2, and 2 with TP2 (vocabulary shards of the logits),
equal the 1-rank run (fp64, 1e-10), which equals a hand formula of the loss written from the logits.

The micro-batch is built by this test in slime's convention (THUDM/slime: backends/megatron_utils/data.py
``get_batch``, cp_utils.py ``slice_with_cp`` / ``slice_log_prob_with_cp`` / ``get_sum_of_sample_mean``): per-sample
lists ``unconcat_tokens`` [total_i], ``total_lengths``, ``response_lengths``, ``loss_masks`` [response_i] (full);
``advantages``, ``log_probs`` and ``rollout_log_probs`` sliced to this CP rank's response positions (chunk r, then
chunk 2c−1−r, of the sample padded to 2c·⌈total/2c⌉); logits [1, T, V] packed the same way, padded at the end; and
``sum_of_sample_mean`` as slime defines it. Gradients are taken w.r.t. one global logits table [S, L, V] from which
every rank's packed logits are gathered, so the CP ranks' gradients add up to the 1-rank gradient.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from vespo_megatron.megatron.parallel import init_parallel, spawn

pytestmark = [pytest.mark.slow]

VOCAB = 14  # even: TP2 splits it in two shards
SAMPLES = {  # (prompt length, response length); "cp-empty": CP rank 0 holds no response token at all
    "mixed": [(5, 7), (3, 1), (8, 4), (2, 9), (7, 2)],
    "cp-empty": [(7, 2), (6, 3)],
}
ADVANTAGES = [1.2, -0.8, 0.5, -1.5, 0.0]
CASES = {  # name: (samples, loss function, slime args, per-token normaliser)
    "plain": ("mixed", "vespo_loss", {}, False),
    "tis-explicit": ("mixed", "vespo_loss", {"use_tis": True, "tis_clip": 2.0, "vespo_k_pos": 1.5,
                                             "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.5, "vespo_lambda_neg": 1.5},
                     False),
    "rollout-mu-temperature-entropy": ("mixed", "vespo_loss",
                                       {"use_rollout_logprobs": True, "rollout_temperature": 0.8, "entropy_coef": 0.01},
                                       False),
    "lin-per-token": ("mixed", "vespo_lin_loss", {}, True),
    "sqrt": ("mixed", "vespo_sqrt_loss", {}, False),
    "cp-empty-rank": ("cp-empty", "vespo_loss", {}, False),
}
SIGN_FREE_METRICS = ("loss", "pg_loss", "entropy_loss", "ppo_kl", "actor/approx_kl", "vespo/log_w_seq_mean",
                     "vespo/w_seq_mean", "vespo/k_pos", "vespo/lambda_neg", "objective/n_active_seq")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "broadcast", "all_to_all",
               "all_to_all_single", "send", "recv", "reduce")


def _data(kind: str) -> dict:
    """Global fp64 data: logits table [S, L, V], tokens, full-length old / rollout log-probs, masks, advantages."""
    samples = SAMPLES[kind]
    gen = torch.Generator().manual_seed(len(samples))
    width = max(p + r for p, r in samples)
    table = torch.randn(len(samples), width, VOCAB, generator=gen, dtype=torch.float64) * 1.5
    tokens = [torch.randint(0, VOCAB, (p + r,), generator=gen) for p, r in samples]
    true_lp = [_hand_log_probs(table, tokens, samples, i, 1.0)[0] for i in range(len(samples))]
    old = [(lp + 0.2 * torch.randn(lp.shape, generator=gen, dtype=torch.float64)).clamp(max=-1e-6) for lp in true_lp]
    rollout = [(o + 0.3 * torch.randn(o.shape, generator=gen, dtype=torch.float64)).clamp(max=-1e-6) for o in old]
    masks = [torch.ones(r, dtype=torch.int) for _, r in samples]
    masks[0][-2] = 0  # a masked token inside a response (e.g. a tool output)
    adv = [torch.full((r,), ADVANTAGES[i], dtype=torch.float64) for i, (_, r) in enumerate(samples)]
    return dict(samples=samples, table=table, tokens=tokens, old=old, rollout=rollout, masks=masks, adv=adv)


def _positions(total: int, response: int, rank: int, cp: int) -> list[int]:
    """This CP rank's response logit positions, chunk r first then chunk 2c−1−r (slime's order)."""
    first, end = total - response - 1, total - 1
    if cp == 1:
        return list(range(first, end))
    k = math.ceil(total / (2 * cp))
    return [p for c in (rank, 2 * cp - 1 - rank) for p in range(c * k, (c + 1) * k) if first <= p < end]


def _slime_batch(data: dict, table: torch.Tensor, rank: int, cp: int, per_token: bool):
    """(batch, logits [1, T, V], sum_of_sample_mean) of this rank in slime's convention."""
    rows, local = [], {"old": [], "rollout": [], "adv": [], "mask": []}
    for i, (prompt, response) in enumerate(data["samples"]):
        total = prompt + response
        seq = table[i, :total]
        if cp == 1:
            rows.append(seq)
        else:
            k = math.ceil(total / (2 * cp))
            padded = torch.cat([seq, seq.new_zeros(2 * cp * k - total, VOCAB)])
            rows += [padded[rank * k:(rank + 1) * k], padded[(2 * cp - 1 - rank) * k:(2 * cp - rank) * k]]
        index = [p - (prompt - 1) for p in _positions(total, response, rank, cp)]
        for key in local:
            local[key].append(data[key if key != "mask" else "masks"][i][index])
    logits = torch.cat(rows)
    logits = torch.cat([logits, logits.new_zeros(-logits.shape[0] % 8, VOCAB)])[None]
    denoms = [m.sum() for m in data["masks"]]

    def sum_of_sample_mean(x: torch.Tensor) -> torch.Tensor:
        parts = x.split([len(m) for m in local["mask"]])
        return sum((xi * mi).sum() / (1 if per_token else torch.clamp_min(d, 1))
                   for xi, mi, d in zip(parts, local["mask"], denoms))

    batch = {
        "unconcat_tokens": data["tokens"], "total_lengths": [p + r for p, r in data["samples"]],
        "response_lengths": [r for _, r in data["samples"]], "loss_masks": data["masks"],
        "advantages": local["adv"], "log_probs": local["old"], "rollout_log_probs": local["rollout"],
    }
    return batch, logits, sum_of_sample_mean


def _rank_cases(rank: int, cp: int, tp: int = 1) -> dict:
    from vespo_megatron.integrations import slime

    init_parallel(tp=tp, cp=cp)
    out = {}
    for case, (kind, fn_name, extra, per_token) in CASES.items():
        data = _data(kind)
        table = data["table"].clone().requires_grad_(True)
        batch, logits, reducer = _slime_batch(data, table, rank, cp, per_token)
        logits = logits.chunk(tp, dim=-1)[rank % tp]  # this TP rank's vocabulary shard
        args = SimpleNamespace(calculate_per_token_loss=per_token, **extra)
        sent: list[str] = []
        originals = {n: getattr(dist, n) for n in COLLECTIVES}

        def counting(n):
            def call(*a, **kw):
                sent.append(n)
                return originals[n](*a, **kw)
            return call

        for n in COLLECTIVES:
            setattr(dist, n, counting(n))
        try:
            loss, metrics = getattr(slime, fn_name)(args, batch, logits, reducer)
            loss.backward()
        finally:
            for n, fn in originals.items():
                setattr(dist, n, fn)
        out[case] = {"loss": float(loss.detach()), "grad": table.grad, "sent": sent,
                     "metrics": {k: float(v) for k, v in metrics.items()}}
    return out


def _hand_log_probs(table, tokens, samples, i, temperature):
    prompt, response = samples[i]
    z = table[i, prompt - 1:prompt + response - 1] / temperature
    logsm = torch.log_softmax(z, dim=-1)
    lp = logsm.gather(1, tokens[i][prompt:prompt + response, None])[:, 0]
    return lp, -(logsm.exp() * logsm).sum(-1)


def _hand_loss(case: str) -> tuple[float, torch.Tensor]:
    """The VESPO loss with slime's normaliser, written from the logits table (1 process, no slime layout)."""
    kind, fn_name, extra, per_token = CASES[case]
    data = _data(kind)
    hp = {"k_pos": extra.get("vespo_k_pos", 2.0), "lambda_pos": extra.get("vespo_lambda_pos", 3.0),
          "k_neg": extra.get("vespo_k_neg", 3.0), "lambda_neg": extra.get("vespo_lambda_neg", 2.0)}
    table = data["table"].clone().requires_grad_(True)
    total = 0.0
    for i in range(len(data["samples"])):
        lp, entropy = _hand_log_probs(table, data["tokens"], data["samples"], i, extra.get("rollout_temperature", 1.0))
        m = data["masks"][i].to(torch.float64)
        old = data["rollout"][i] if extra.get("use_rollout_logprobs") else data["old"][i]
        log_w = (torch.clamp(lp.detach() - old, -20, 20) * m).sum()
        if extra.get("use_tis"):
            rho = torch.exp(torch.clamp(old - data["rollout"][i], -20, 20)).clamp(max=extra["tis_clip"])
            log_w = log_w + (torch.log(rho.clamp(min=1e-8)).clamp(-20, 20) * m).sum()
        log_w = log_w / {"vespo_loss": 1.0, "vespo_lin_loss": m.sum(), "vespo_sqrt_loss": m.sum().sqrt()}[fn_name]
        w = torch.exp(log_w.clamp(-20, 20))
        k, lam = (hp["k_pos"], hp["lambda_pos"]) if ADVANTAGES[i] >= 0 else (hp["k_neg"], hp["lambda_neg"])
        phi = torch.exp(lam + k * torch.log(w.clamp(min=1e-8)) - lam * w)
        denom = 1.0 if per_token else m.sum().clamp(min=1)
        total = total + ((-phi * data["adv"][i] * lp * m).sum()
                         - extra.get("entropy_coef", 0.0) * (entropy * m).sum()) / denom
    total.backward()
    return float(total.detach()), table.grad


@pytest.fixture(scope="module")
def runs():
    return spawn(_rank_cases, 1, 1)[0], spawn(_rank_cases, 2, 2)


@pytest.fixture(scope="module")
def tp_runs(runs):
    return runs[0], spawn(_rank_cases, 2, 1, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_one_rank_equals_hand_formula(runs, case):
    one, _ = runs
    loss, grad = _hand_loss(case)
    assert abs(one[case]["loss"] - loss) <= 1e-10
    assert grad.abs().max() > 1e-3
    assert torch.allclose(one[case]["grad"], grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_cp2_equals_one_rank(runs, case):
    one, two = runs
    assert abs(sum(r[case]["loss"] for r in two) - one[case]["loss"]) <= 1e-10
    assert torch.allclose(two[0][case]["grad"] + two[1][case]["grad"], one[case]["grad"], rtol=0, atol=1e-10)
    if case == "cp-empty-rank":  # rank 0 holds no response token: a zero share that still joins the all-reduce
        assert two[0][case]["loss"] == 0 and not two[0][case]["grad"].any() and two[1][case]["grad"].any()
    for key in SIGN_FREE_METRICS:  # weighted by sum_of_sample_mean(1): the CP ranks' shares add up
        assert sum(r[case]["metrics"][key] for r in two) == pytest.approx(one[case]["metrics"][key], abs=1e-10), key


@pytest.mark.parametrize("case", list(CASES))
def test_one_all_reduce_over_cp(runs, case):
    one, two = runs
    assert one[case]["sent"] == []
    assert [r[case]["sent"] for r in two] == [["all_reduce"], ["all_reduce"]]


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_equals_one_rank(tp_runs, case):
    """Both TP ranks compute the whole loss from their vocabulary shards; the shard gradients add up."""
    one, two = tp_runs
    for rank in two:
        assert abs(rank[case]["loss"] - one[case]["loss"]) <= 1e-10
    assert torch.allclose(two[0][case]["grad"] + two[1][case]["grad"], one[case]["grad"], rtol=0, atol=1e-10)
    assert not two[0][case]["grad"][..., VOCAB // 2:].any() and not two[1][case]["grad"][..., :VOCAB // 2].any()
