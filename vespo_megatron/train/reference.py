"""The frozen reference policy π_ref of the KL term (``--kl-coef``, ``--ref-load``).

π_ref is a second Megatron model of the policy's architecture and parallel layout (this rank holds the same shards
as for the policy), built only when kl_coef != 0: its weights come from ``--ref-load`` (a Megatron distributed
checkpoint directory, as our converter writes, or a training ``--save`` directory, whose latest iteration is read),
or by default from the policy's initial weights (copied before any ``--load`` resume, so a resumed run keeps the
reference of its first step). It has no gradients, no DDP wrapper and no optimizer; it is built in the policy's
dtype and, in bf16 runs, sits in Megatron's Float16Module as the policy does (bf16 weights, fp32 logits). Its
log-probs log π_ref(y_t) [t] of each micro-batch are computed in the old-log-prob pass of every step, of logits / τ
as π_old's, and with the routing of that pass: R3 replays the rollout engine's experts in π_ref as in π_old;
otherwise (R2 records π_old's live routing, or no replay) π_ref routes live. With π_ref = the initial weights, the
KL of the first update of step 0 is exactly 0.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence

import torch

from vespo_megatron import preflight
from vespo_megatron.megatron.batch import MicroBatch
from vespo_megatron.megatron.checkpointing import load_model
from vespo_megatron.megatron.model import build_model
from vespo_megatron.megatron.step import mixed_precision, old_log_probs
from vespo_megatron.routing.replay import RoutingReplay

logger = logging.getLogger(__name__)


class Reference:
    """π_ref on this rank: the frozen model and, under R3, its own routing replay (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, routing_replay: str) -> None:
        self.model = model
        self.replay = RoutingReplay(model, "r3") if routing_replay == "r3" else None

    @classmethod
    def build(cls, hf, policy: torch.nn.Module, *, ref_load: Optional[str], routing_replay: str,
              model_options: Optional[dict] = None) -> "Reference":
        """π_ref for the policy ``policy``.

        Args:
            hf: the HF config the policy was built from (``build_model``).
            policy: the policy model of this rank (a GPTModel, or a wrapper with ``.module``), its initial weights
                loaded and not yet resumed.
            ref_load: ``--ref-load`` (loaded collectively on every rank), or None: a copy of ``policy``'s weights.
            routing_replay: ``--routing-replay``; "r3" gives π_ref its own replay of the engine's experts.
            model_options: the keyword arguments of ``build_model`` the policy was built with (TE spec, dispatcher,
                recomputation); the dtype is the policy's.

        Returns:
            The frozen reference.
        """
        while hasattr(policy, "module"):  # DDP / Float16Module wrappers: the GPTModel's own keys
            policy = policy.module
        model = build_model(hf, dtype=policy.config.params_dtype, **(model_options or {}))
        if ref_load:
            load_model(model, preflight.model_checkpoint_or_save(ref_load, "--ref-load"), what="--ref-load")
        else:
            model.load_state_dict(policy.state_dict())
        model.requires_grad_(False)
        model.eval()
        logger.info("reference model π_ref from %s", ref_load or "the initial weights")
        return cls(mixed_precision(model), routing_replay)

    @torch.no_grad()
    def log_probs(self, micro_batches: Sequence[MicroBatch], temperature: float = 1.0) -> list[Optional[torch.Tensor]]:
        """log π_ref [t] of every micro-batch's labels (logits / ``temperature``); None off the last pipeline stage."""
        phase = (self.replay.phase("old_logprob", [mb.routing for mb in micro_batches]) if self.replay is not None
                 else contextlib.nullcontext())
        with phase:
            out = old_log_probs(self.model, micro_batches, temperature=temperature)
        if self.replay is not None:
            self.replay.health.pop()  # π_old's pass reports the replay health; this one's counters are dropped
        return out

    def attach(self, micro_batches: Sequence[MicroBatch], temperature: float = 1.0) -> None:
        """Set ``mb.ref_log_prob`` of every micro-batch (collective over the model's groups)."""
        for mb, ref in zip(micro_batches, self.log_probs(micro_batches, temperature)):
            mb.ref_log_prob = ref

    def close(self) -> None:
        if self.replay is not None:
            self.replay.remove()
