"""VESPO as a loss for slime's custom-loss hook (written against THUDM/slime's Megatron backend, commit 624b824a).

    --loss-type custom_loss --custom-loss-function-path vespo_megatron.integrations.slime.vespo_loss
    (or vespo_lin_loss / vespo_sqrt_loss for the ablations)

slime calls ``fn(args, batch, logits, sum_of_sample_mean)`` on the last pipeline stage and expects
``(loss, metrics)``. What this module reads, in slime's conventions:

- ``logits`` [1, T, V/tp]: this rank's vocabulary shard of the packed micro-batch. Without context parallelism the
  samples are concatenated (sample i at rows [o_i, o_i + total_i)); with CP size c each sample is padded to
  2c·k_i tokens (k_i = ⌈total_i / 2c⌉) and rank r holds its chunks r and 2c−1−r, i.e. sequence positions
  [r·k_i, (r+1)·k_i) then [(2c−1−r)·k_i, (2c−r)·k_i), 2k_i rows per sample. Row p predicts token p + 1, so sample
  i's response log-probs sit at positions [prompt_i − 1, total_i − 1). Rows past the samples are padding.
- ``batch``: per-sample lists ``unconcat_tokens`` [total_i] (prompt + response ids), ``total_lengths``,
  ``response_lengths``, ``loss_masks`` [response_i] (full length), and this CP rank's slices (the positions above,
  chunk r first) of ``advantages``, ``log_probs`` (π_old) and ``rollout_log_probs`` (μ).
- ``sum_of_sample_mean(x)``: slime's normaliser of a token vector x (this rank's response tokens, sample by sample):
  Σ_i Σ_t x·m / denom_i (or Σ x·m with ``--calculate-per-token-loss``); slime's loss_function then scales it for
  Megatron, so the CP ranks' values add up to the micro-batch's.

Per micro-batch: token log-probs and entropy from the vocabulary-parallel logits (``vocab_parallel_logprobs`` over
slime's TP group, logits divided by ``rollout_temperature`` as slime does); the registered objective on the packed
tokens, whose per-sequence log-W is completed by ONE all-reduce of a [k, num_seqs] tensor over slime's CP group
(``cp_seq_sum``); loss = sum_of_sample_mean(L − entropy_coef·H) with L_t = −φ_i·A_t·logπ_t, in the one loss
assembly (the entropy term is its regulariser).

Configuration, from slime's args (``--custom-config-path`` YAML keys become args):
- ``vespo_k_pos``, ``vespo_lambda_pos``, ``vespo_k_neg``, ``vespo_lambda_neg`` (the official k / λ; absent or None:
  the paper's 2, 3, 3, 2); any other ``vespo_*`` arg is an error.
- slime's own: ``use_rollout_logprobs`` (μ = rollout log-probs as π_old: fully asynchronous training),
  ``use_tis`` + ``tis_clip`` (token TIS min(π_old/μ, tis_clip) folded into logW, as the official code does),
  ``entropy_coef``, ``rollout_temperature``. Rejected because this loss would not honour them: ``use_kl_loss``,
  ``use_opsm``, ``allgather_cp``, ``custom_tis_function_path``, ``custom_pg_loss_reducer_function_path``, a non-zero
  ``tis_clip_low``, and ``use_tis`` together with ``use_rollout_logprobs`` (W would count the mismatch twice).

The sign source of the asymmetric kernel is the advantage of the sequence's first response token on this rank. With
advantages constant along each sequence (slime's grpo, gspo and cispo estimators) loss and gradients are therefore
exact under CP; with per-token advantages the CP ranks may pick different signs (a warning is logged). A rank that
holds no response token of a sequence trains none of its tokens; its φ and per-sign metrics use the A ≥ 0 kernel.
Metrics: slime's loss, pg_loss, entropy_loss, ppo_kl, and the objective's metrics (vespo/*, actor/approx_kl, ...)
each multiplied by sum_of_sample_mean(1), so slime's reduction reports their sample- (or token-) weighted mean over
micro-batches and ranks.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import Tensor

from vespo_megatron.megatron.logprobs import vocab_parallel_logprobs
from vespo_megatron.megatron.loss import cp_seq_sum
from vespo_megatron.megatron.parallel import loss_groups, ranks
from vespo_megatron.objectives import PackedPolicyInput, PolicyLossConfig, RegularizerConfig, assemble_policy_loss

logger = logging.getLogger(__name__)

SumOfSampleMean = Callable[[Tensor], Tensor]
HPARAM_ARGS: dict[str, str] = {  # slime arg -> official name
    "vespo_k_pos": "k_pos", "vespo_lambda_pos": "lambda_pos", "vespo_k_neg": "k_neg", "vespo_lambda_neg": "lambda_neg",
}
UNSUPPORTED_FLAGS: tuple[str, ...] = (
    "use_kl_loss", "use_opsm", "allgather_cp", "custom_tis_function_path", "custom_pg_loss_reducer_function_path",
)


def vespo_loss(args: Any, batch: dict, logits: Tensor, sum_of_sample_mean: SumOfSampleMean) -> tuple[Tensor, dict]:
    """slime custom loss: VESPO (the true sequence product W)."""
    return slime_policy_loss("vespo", args, batch, logits, sum_of_sample_mean)


def vespo_lin_loss(args: Any, batch: dict, logits: Tensor, sum_of_sample_mean: SumOfSampleMean) -> tuple[Tensor, dict]:
    """slime custom loss: the VESPO-lin ablation (kernel of logW / T)."""
    return slime_policy_loss("vespo-lin", args, batch, logits, sum_of_sample_mean)


def vespo_sqrt_loss(args: Any, batch: dict, logits: Tensor, sum_of_sample_mean: SumOfSampleMean) -> tuple[Tensor, dict]:
    """slime custom loss: the VESPO-sqrt ablation (kernel of logW / √T)."""
    return slime_policy_loss("vespo-sqrt", args, batch, logits, sum_of_sample_mean)


def loss_config(args: Any) -> PolicyLossConfig:
    """The objective's hyper-parameters from slime's args; ValueError naming the arg for bad configuration."""
    given = vars(args) if hasattr(args, "__dict__") else {}
    unknown = sorted(k for k in given if k.startswith("vespo_") and k not in HPARAM_ARGS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown VESPO argument; known: {', '.join(HPARAM_ARGS)}")
    for flag in UNSUPPORTED_FLAGS:
        if getattr(args, flag, None):
            raise ValueError(f"{flag}: not supported by the VESPO custom loss (set it off)")
    tis = bool(getattr(args, "use_tis", False))
    if tis and getattr(args, "tis_clip_low", 0):
        raise ValueError(f"tis_clip_low: VESPO's TIS has no lower clip, got {args.tis_clip_low!r} (set it to 0)")
    if tis and getattr(args, "use_rollout_logprobs", False):
        raise ValueError("use_tis: with use_rollout_logprobs, W already measures π_θ/μ; TIS would count it twice")
    hparams: dict[str, Any] = {HPARAM_ARGS[k]: v for k, v in given.items() if k in HPARAM_ARGS and v is not None}
    if tis:
        hparams.update(tis=True, tis_cap=getattr(args, "tis_clip", 2.0))
    arg_of = {**{v: k for k, v in HPARAM_ARGS.items()}, "tis_cap": "tis_clip"}
    try:
        return PolicyLossConfig.from_hparams(**hparams)
    except ValueError as err:
        key, _, reason = str(err).partition(":")
        key = key.split(" ", 1)[0]
        raise ValueError(f"{arg_of.get(key, key)}:{reason}") from None


def response_layout(
    total_lengths: list[int], response_lengths: list[int], cp_rank: int, cp_size: int, num_rows: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where this rank's response log-probs sit in slime's packed logits (see the module docstring).

    Returns, over this rank's response tokens in slime's order (sample by sample, chunk r first), all int64 [R]:
    ``rows`` (row of the local logits), ``positions`` (position p in the sample; the label is token p + 1),
    ``seq_ids`` (sample index) and ``response_index`` (p − prompt + 1, the index into the full response).
    """
    rows, positions, seq_ids = [], [], []
    offset = 0
    for i, (total, response) in enumerate(zip(total_lengths, response_lengths)):
        if not 0 < response < total:
            raise ValueError(f"response_lengths[{i}]: {response} must be in [1, total_lengths[{i}]={total})")
        first, end = total - response - 1, total - 1  # logit positions of the response tokens
        if cp_size == 1:
            spans, width = [(0, total)], total
        else:
            k = -(-total // (2 * cp_size))
            mirror = 2 * cp_size - 1 - cp_rank
            spans, width = [(cp_rank * k, (cp_rank + 1) * k), (mirror * k, (mirror + 1) * k)], 2 * k
        local = 0
        for start, stop in spans:
            lo, hi = max(start, first), min(stop, end)
            if lo < hi:
                positions.append(torch.arange(lo, hi))
                rows.append(torch.arange(lo, hi) - start + offset + local)
                seq_ids.append(torch.full((hi - lo,), i))
            local += stop - start
        offset += width
    if offset > num_rows:
        raise ValueError(f"logits: {num_rows} rows, but the samples of this micro-batch need {offset} on CP rank "
                         f"{cp_rank} of {cp_size}")
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)  # noqa: E731
    pos, ids = cat(positions), cat(seq_ids)
    first_response = torch.tensor([t - r - 1 for t, r in zip(total_lengths, response_lengths)], dtype=torch.int64)
    return cat(rows), pos, ids, pos - first_response[ids]


def slime_policy_loss(
    name: str, args: Any, batch: dict, logits: Tensor, sum_of_sample_mean: SumOfSampleMean
) -> tuple[Tensor, dict[str, Tensor]]:
    """The registered objective ``name`` on one slime micro-batch (layout and math in the module docstring).

    Args:
        name: vespo, vespo-lin or vespo-sqrt (any registered objective works the same way).
        args: slime's argument namespace (the configuration listed in the module docstring).
        batch: slime's micro-batch dict (per-sample lists; CP-local slices of the token fields).
        logits: [1, T, V/tp] this rank's vocabulary shard of the packed logits.
        sum_of_sample_mean: slime's normaliser of a [R] vector of this rank's response tokens.
    Returns:
        (loss: scalar, this rank's share, carrying the gradient of ``logits``; metrics: name -> 0-d tensor).
    """
    cfg = loss_config(args)
    totals, responses = list(batch["total_lengths"]), list(batch["response_lengths"])
    num_seqs = len(totals)
    if num_seqs == 0 or len(responses) != num_seqs:
        raise ValueError(f"response_lengths: {len(responses)} entries for {num_seqs} total_lengths (need >= 1)")
    if logits.dim() != 3 or logits.shape[0] != 1:
        raise ValueError(f"logits: expected [1, T, V/tp], got {tuple(logits.shape)}")
    from_rollout = bool(getattr(args, "use_rollout_logprobs", False))
    if (cfg.tis or from_rollout) and not _has(batch, "rollout_log_probs"):
        flag = "use_tis" if cfg.tis else "use_rollout_logprobs"
        raise ValueError(f"rollout_log_probs: missing from the batch; {flag} needs the rollout engine's log-probs")
    reg = RegularizerConfig(entropy_coef=float(getattr(args, "entropy_coef", 0.0) or 0.0))
    tp_group, cp_group = loss_groups()
    place = ranks()
    rows, positions, seq_ids, response_index = response_layout(totals, responses, place.cp_rank, place.cp,
                                                                logits.shape[1])
    device = logits.device
    rows, seq_ids, response_index = rows.to(device), seq_ids.to(device), response_index.to(device)
    counts = torch.bincount(seq_ids, minlength=num_seqs)

    labels = torch.zeros(logits.shape[1], dtype=torch.long, device=device)
    if rows.numel():
        labels[rows] = _gather_tokens(batch["unconcat_tokens"], totals, positions + 1, seq_ids, device)
    temperature = float(getattr(args, "rollout_temperature", 1.0) or 1.0)
    scaled = logits[0] if temperature == 1.0 else logits[0] / temperature
    logp_all, entropy_all = vocab_parallel_logprobs(scaled, labels, group=tp_group)
    logp, entropy = logp_all[rows], entropy_all[rows]
    dtype = logp.dtype

    mask = torch.cat([torch.as_tensor(m, device=device) for m in _per_sample(batch, "loss_masks", responses)])
    mask = mask[_global_index(response_index, seq_ids, responses)].to(dtype)
    advantages = _local(batch, "advantages", counts, device, dtype)
    rollout = _local(batch, "rollout_log_probs", counts, device, dtype) if cfg.tis or from_rollout else None
    if from_rollout:
        old = rollout
    else:
        old = _local(batch, "log_probs", counts, device, dtype) if _has(batch, "log_probs") else logp.detach()

    seq_adv = torch.zeros(num_seqs, dtype=dtype, device=device)
    starts = torch.cumsum(counts, 0) - counts
    present = counts > 0
    seq_adv[present] = advantages[starts[present]]
    if place.cp > 1 and rows.numel() and bool((advantages != seq_adv[seq_ids]).any()):
        logger.warning("advantages vary along a sequence: under context parallelism each CP rank takes VESPO's sign "
                       "source from its own first response token, which may differ from the sequence's first")
    empty = rows.numel() == 0  # this CP rank holds no response token: a masked placeholder keeps the collective
    one = lambda x: x if not empty else x.new_zeros(1)  # noqa: E731
    inp = PackedPolicyInput(
        log_prob=one(logp), old_log_prob=one(old), advantages=one(advantages), response_mask=one(mask),
        seq_ids=seq_ids if not empty else torch.zeros(1, dtype=torch.int64, device=device), seq_advantages=seq_adv,
        num_seqs=num_seqs, rollout_log_prob=None if rollout is None else one(rollout),
        entropy=one(entropy if reg.entropy_coef else entropy.detach()), seq_sum=cp_seq_sum(cp_group),
    )
    local = rows.numel()  # the per-token loss of this rank's response tokens (the placeholder dropped)
    loss, loss_metrics = assemble_policy_loss(name, inp, cfg, aggregate=lambda t: sum_of_sample_mean(t[:local]),
                                              regularizer=reg)
    entropy_loss = loss_metrics.pop("entropy_loss", None)
    if entropy_loss is None:  # logged also without the entropy term
        entropy_loss = sum_of_sample_mean(entropy.detach())
    pg_loss = loss.detach() + reg.entropy_coef * entropy_loss
    if empty:
        loss = loss + 0 * logits.sum()  # as slime does: backward reaches the logits on every rank
    weight = torch.as_tensor(sum_of_sample_mean(torch.ones_like(logp[:local])), dtype=torch.float64).detach()
    metrics: dict[str, Tensor] = {
        "loss": loss.detach().clone(), "pg_loss": torch.as_tensor(pg_loss, dtype=loss.dtype).detach().clone(),
        "entropy_loss": torch.as_tensor(entropy_loss, dtype=loss.dtype).detach().clone(),
        "ppo_kl": torch.as_tensor(sum_of_sample_mean(old - logp.detach())).detach(),
    }
    metrics.update({key: weight * value for key, value in loss_metrics.items()})
    return loss, metrics


def _has(batch: dict, key: str) -> bool:
    value = batch.get(key)
    return value is not None and len(value) > 0


def _per_sample(batch: dict, key: str, expected: list[int]) -> list:
    values = batch.get(key)
    if values is None or len(values) != len(expected):
        got = "missing" if values is None else f"{len(values)} samples"
        raise ValueError(f"{key}: {got}, expected one entry per sample ({len(expected)})")
    for i, (value, n) in enumerate(zip(values, expected)):
        if len(value) != n:
            raise ValueError(f"{key}[{i}]: {len(value)} values, expected {n}")
    return list(values)


def _local(batch: dict, key: str, counts: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """This rank's slices of per-sample token values ``batch[key]``, concatenated [R]."""
    values = _per_sample(batch, key, counts.tolist())
    parts = [torch.as_tensor(v, device=device).to(dtype) for v in values]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)


def _global_index(response_index: Tensor, seq_ids: Tensor, responses: list[int]) -> Tensor:
    """Index into the concatenated full per-sample response vectors of each local token."""
    starts = torch.tensor([0] + responses[:-1], device=response_index.device).cumsum(0)
    return starts[seq_ids] + response_index


def _gather_tokens(tokens: list, totals: list[int], positions: Tensor, seq_ids: Tensor, device: torch.device) -> Tensor:
    flat = torch.cat([torch.as_tensor(t, device=device).long() for t in _per_sample({"unconcat_tokens": tokens},
                                                                                    "unconcat_tokens", totals)])
    starts = torch.tensor([0] + totals[:-1], device=device).cumsum(0)
    return flat[starts[seq_ids] + positions.to(device)]

