"""Per-token log-probs and entropy from vocabulary-parallel logits, without gathering the vocabulary.

For logits z [t, V/tp] (this rank's vocabulary slice, already divided by the sampling temperature τ: z = logits / τ,
as the rollout engine's log-probs are log_softmax(logits / τ)) and labels y [t]:
    lse_t = log Σ_v exp z_tv                      (max all-reduced, then Σexp all-reduced over the TP group)
    logp_t = z_{t,y_t} − lse_t                    (the label's logit lives on one rank; all-reduced)
    H_t = lse_t − Σ_v p_tv z_tv                   (Σ p z all-reduced together with Σexp and the label logit)
Backward (no communication): ∂logp/∂z = onehot(y) − p,  ∂H/∂z = −p ⊙ (z − E_p[z]); ∂/∂logits = ∂/∂z / τ.
Work is done in fp32 (fp64 for fp64 logits) over token chunks of about ``chunk_elems`` elements, so the extra memory is one chunk, not
[t, V]. With ``inplace_backward`` the gradient is written into the logits' own storage (the logits are not needed
after this function in the training loss), so no [t, V] gradient is allocated either. Vocabulary padding columns
(global index ≥ ``vocab_size``) are excluded.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

CHUNK_ELEMS_CUDA = 1 << 22  # few large kernels on GPU
CHUNK_ELEMS_CPU = 1 << 19  # ~2 MiB fp32 chunks stay in cache on CPU


def _chunks(n_tokens: int, vocab: int, chunk_elems: int) -> range:
    return range(0, n_tokens, max(1, chunk_elems // max(vocab, 1)))


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, valid, group, chunk_elems, inplace_backward, inv_temp):
        z_all = logits[:, :valid]  # [t, valid] local columns that are real vocabulary
        acc = torch.promote_types(logits.dtype, torch.float32)
        t = logits.shape[0]
        step = _chunks(t, valid, chunk_elems).step

        def scaled(block: torch.Tensor) -> torch.Tensor:  # z = logits / τ in the work precision
            block = block.to(acc)
            return block if inv_temp == 1.0 else block * inv_temp

        m = torch.full((t,), float("-inf"), dtype=acc, device=logits.device)
        for s in range(0, t if valid else 0, step):
            m[s : s + step] = scaled(z_all[s : s + step]).amax(dim=-1)
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        sums = torch.zeros(3, t, dtype=acc, device=logits.device)  # Σexp(z−m), Σexp(z−m)·z, z_label
        local = labels - vocab_start
        owned = (local >= 0) & (local < valid)
        for s in range(0, t, step):
            z = scaled(z_all[s : s + step])
            e = torch.sub(z, m[s : s + step, None]).exp_()
            sums[0, s : s + step] = e.sum(dim=-1)
            sums[1, s : s + step] = torch.linalg.vecdot(e, z)
        idx = torch.where(owned, local, torch.zeros_like(local))
        if valid:
            sums[2] = torch.where(owned, scaled(z_all.gather(1, idx[:, None])[:, 0]), torch.zeros_like(m))
        if group is not None:
            dist.all_reduce(sums, group=group)
        lse = m + torch.log(sums[0])
        mean_z = sums[1] / sums[0]
        ctx.save_for_backward(logits, idx, owned, lse, mean_z)
        ctx.valid, ctx.chunk_elems, ctx.inplace, ctx.inv_temp = valid, chunk_elems, inplace_backward, inv_temp
        return sums[2] - lse, lse - mean_z

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, idx, owned, lse, mean_z = ctx.saved_tensors
        grad = logits if ctx.inplace else torch.empty_like(logits)
        valid = ctx.valid
        t = logits.shape[0]
        step = _chunks(t, valid, ctx.chunk_elems).step
        inv_temp = ctx.inv_temp
        g_lp = grad_logp.to(lse.dtype)  # autograd passes zeros for an output that is not used
        neg_g_h = -grad_entropy.to(lse.dtype)
        if inv_temp != 1.0:  # ∂/∂logits = ∂/∂z / τ: fold 1/τ into both upstream gradients
            g_lp, neg_g_h = g_lp * inv_temp, neg_g_h * inv_temp
        for s in range(0, t, step):
            z = logits[s : s + step, :valid].to(lse.dtype)
            if inv_temp != 1.0:
                z = z * inv_temp
            p = torch.sub(z, lse[s : s + step, None]).exp_()
            # −p·(g_lp + g_H·(z − E[z]))  (+ g_lp on the label column, added below)
            g = torch.sub(z, mean_z[s : s + step, None]).mul_(neg_g_h[s : s + step, None]).sub_(g_lp[s : s + step, None])
            if grad.dtype == g.dtype:
                torch.mul(p, g, out=grad[s : s + step, :valid])
            else:
                grad[s : s + step, :valid].copy_(p.mul_(g))
        if valid < logits.shape[1]:
            grad[:, valid:] = 0
        rows = torch.nonzero(owned)[:, 0]
        grad[rows, idx[rows]] += g_lp[rows].to(grad.dtype)
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
    chunk_elems: Optional[int] = None,
    inplace_backward: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and entropy per token, both [t] (fp32, or fp64 for fp64 logits), from this rank's logits slice [t, V/tp].

    ``group``: the tensor-parallel group (None or size 1: the whole vocabulary is local). ``vocab_size``: the real
    vocabulary (columns at or past it are padding and ignored); default: no padding. ``chunk_elems``: elements per
    fp32 work chunk (default by device). ``temperature``: τ, the log-probs and entropy are those of logits / τ.
    """
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [t, V/tp] and labels [t]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    tp = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    part = logits.shape[1]
    vocab_start = rank * part
    total = vocab_size if vocab_size is not None else part * tp
    if not part * (tp - 1) < total <= part * tp:
        raise ValueError(f"vocab_size {total} does not fit {tp} shards of {part} columns")
    valid = int(min(max(total - vocab_start, 0), part))
    bad = (labels < 0) | (labels >= total)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{row}]={int(labels[row])} outside [0, {total})")
    if chunk_elems is None:
        chunk_elems = CHUNK_ELEMS_CUDA if logits.is_cuda else CHUNK_ELEMS_CPU
    return _VocabParallelLogProbs.apply(
        logits, labels.long(), vocab_start, valid, group if tp > 1 else None, chunk_elems, inplace_backward,
        1.0 / float(temperature),
    )
