"""The one HF <-> Megatron-Core name and shape mapping, used by the file converters, the in-memory weight sync and the
logits-parity check.

A :class:`Rule` ties one Megatron tensor — a dist-checkpoint ``key`` at position ``index`` on the key's leading axes
(layer when keys are stacked, expert for routed experts) — to the HF checkpoint tensors it is made of. Megatron keys
are those of ``model.sharded_state_dict()`` for the local or the Transformer Engine layer spec with sequential experts
(also valid for grouped experts, whose dist-checkpoint keys are the same): stacked keys ``decoder.layers.…`` with a
leading [L] axis (homogeneous layers, integer ``moe_layer_freq`` as stock Megatron-Core builds them) or per-layer keys
``decoder.layers.{i}.…`` (mixed dense/MoE layers, or on request). The two norms' keys come from megatron-core's layer
spec (:func:`norm_keys`): local spec ``self_attention.linear_qkv.layer_norm_weight`` and
``mlp.linear_fc1.layer_norm_weight``; Transformer Engine spec the same, except ``pre_mlp_layernorm.weight`` on MoE
layers. Routed experts: key ``….mlp.experts.experts.linear_fc1.weight`` with an [E]
axis indexed by the *global* expert id (rank ep holds ids ep·E/EP … (ep+1)·E/EP − 1).

Multi-latent attention (DeepSeek-V3; every tensor a copy, HF and Megatron share the layout): q_a_proj ->
``self_attention.linear_q_down_proj`` [qr, H], q_a_layernorm -> the q latent norm [qr], q_b_proj -> ``linear_q_up_proj``
[nh·(dn+dr), qr], kv_a_proj_with_mqa ->
``linear_kv_down_proj`` [kvr+dr, H], kv_a_layernorm -> the kv latent norm [kvr], kv_b_proj -> ``linear_kv_up_proj``
[nh·(dn+dv), kvr], o_proj -> ``linear_proj`` [H, nh·dv]; the latent norms' keys from megatron-core's MLA spec
(:func:`vespo_megatron.megatron.layer_keys.mla_norm_keys`). The down projections are column-parallel under the local
spec and replicated (TE ``TELinear``, duplicated) under the Transformer Engine spec.

Shapes: H hidden, nh heads, ng kv groups, d head size, qr / kvr q / kv latent ranks, dn / dr / dv per-head nope /
rope / value sizes, F / Fe / Fs dense / expert / shared intermediate, E experts,
V / Vp vocabulary (padded). qkv [ng·(nh/ng+2)·d, H], linear_proj [H, nh·d], fc1 [2F, H] = [gate; up], fc2 [H, F],
router [E, H], expert_bias [E] (float32), embedding / output [Vp, H].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from vespo_megatron.convert.spec import ModelSpec

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensors it is made of.

    ``op``: copy | qkv (interleave q, k, v) | glu ([gate; up]) | vocab (pad rows to Vp).
    ``split`` (tensor parallelism of the Megatron tensor): replicated | column (dim 0) | row (dim 1) | glu (each half
    on dim 0) | vocab (dim 0 of the padded table). ``module``: the parameter's state-dict name in a model whose layer
    ``{layer}`` and local expert ``{expert}`` are filled in per rank.
    """

    key: str
    index: tuple[int, ...]
    axes: tuple[int, ...]
    shape: tuple[int, ...]
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    op: str
    split: str
    unit: str
    module: str
    layer: int | None = None
    expert: int | None = None
    fp32: bool = False

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self.axes + self.shape

    @property
    def offset(self) -> tuple[int, ...]:
        return self.index + (0,) * len(self.shape)

    @property
    def numel(self) -> int:
        """Elements of the Megatron tensor."""
        return math.prod(self.shape)

    @property
    def hf_numel(self) -> int:
        """Elements of its HF tensors together (fewer than ``numel`` by the vocabulary padding)."""
        return sum(math.prod(shape) for shape in self.hf_shapes)


@dataclass(frozen=True)
class Unit:
    """A group of rules converted (and written) together: the embedding, one decoder layer, or the head."""

    name: str
    rules: tuple[Rule, ...]


class _Builder:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.rules: list[Rule] = []

    def add(self, unit: str, layer: int | None, suffix: str, hf: list[tuple[str, tuple[int, ...]]], shape: tuple[int, ...],
            op: str = "copy", split: str = "replicated", expert: int | None = None, module: str | None = None,
            fp32: bool = False) -> None:
        spec = self.spec
        index: tuple[int, ...] = ()
        axes: tuple[int, ...] = ()
        if layer is None:
            key = suffix
        elif spec.stacked:
            key, index, axes = f"decoder.layers.{suffix}", (layer,), (spec.num_layers,)
        else:
            key = f"decoder.layers.{layer}.{suffix}"
        if expert is not None:
            index, axes = index + (expert,), axes + (spec.num_experts,)
        module = module or suffix
        if layer is not None:
            module = f"decoder.layers.{{layer}}.{module}"
        self.rules.append(Rule(key, index, axes, shape, tuple(n for n, _ in hf), tuple(s for _, s in hf), op, split, unit,
                               module, layer, expert, fp32))


def _attention(b: _Builder, unit: str, i: int, p: str) -> None:
    s = b.spec
    H, nh, ng, d = s.hidden, s.num_heads, s.num_kv_heads, s.head_dim
    qkv_rows = ng * (nh // ng + 2) * d
    b.add(unit, i, "self_attention.linear_qkv.weight",
          [(f"{p}self_attn.q_proj.weight", (nh * d, H)), (f"{p}self_attn.k_proj.weight", (ng * d, H)),
           (f"{p}self_attn.v_proj.weight", (ng * d, H))], (qkv_rows, H), "qkv", "column")
    if s.qkv_bias:
        b.add(unit, i, "self_attention.linear_qkv.bias",
              [(f"{p}self_attn.q_proj.bias", (nh * d,)), (f"{p}self_attn.k_proj.bias", (ng * d,)),
               (f"{p}self_attn.v_proj.bias", (ng * d,))], (qkv_rows,), "qkv", "column")
    if s.qk_norm:
        b.add(unit, i, "self_attention.q_layernorm.weight", [(f"{p}self_attn.q_norm.weight", (d,))], (d,))
        b.add(unit, i, "self_attention.k_layernorm.weight", [(f"{p}self_attn.k_norm.weight", (d,))], (d,))
    b.add(unit, i, "self_attention.linear_proj.weight", [(f"{p}self_attn.o_proj.weight", (H, nh * d))], (H, nh * d),
          split="row")


def _mla_attention(b: _Builder, unit: str, i: int, p: str) -> None:
    s = b.spec
    H, nh, qr, kvr = s.hidden, s.num_heads, s.q_lora_rank, s.kv_lora_rank
    dn, dr, dv = s.qk_nope_head_dim, s.qk_rope_head_dim, s.v_head_dim
    a, q_rows = f"{p}self_attn.", nh * (dn + dr)
    down = "replicated" if s.transformer_impl == "transformer_engine" else "column"
    latent_norms = mla_norm_keys(s.transformer_impl)
    b.add(unit, i, "self_attention.linear_q_down_proj.weight", [(f"{a}q_a_proj.weight", (qr, H))], (qr, H), split=down)
    name, key = latent_norms["q_layernorm"]
    b.add(unit, i, key, [(f"{a}q_a_layernorm.weight", (qr,))], (qr,), module=name)
    b.add(unit, i, "self_attention.linear_q_up_proj.weight", [(f"{a}q_b_proj.weight", (q_rows, qr))], (q_rows, qr),
          split="column")
    b.add(unit, i, "self_attention.linear_kv_down_proj.weight", [(f"{a}kv_a_proj_with_mqa.weight", (kvr + dr, H))],
          (kvr + dr, H), split=down)
    name, key = latent_norms["kv_layernorm"]
    b.add(unit, i, key, [(f"{a}kv_a_layernorm.weight", (kvr,))], (kvr,), module=name)
    b.add(unit, i, "self_attention.linear_kv_up_proj.weight", [(f"{a}kv_b_proj.weight", (nh * (dn + dv), kvr))],
          (nh * (dn + dv), kvr), split="column")
    b.add(unit, i, "self_attention.linear_proj.weight", [(f"{a}o_proj.weight", (H, nh * dv))], (H, nh * dv), split="row")


def _glu_mlp(b: _Builder, unit: str, i: int, hf_prefix: str, mc_prefix: str, ffn: int, names: tuple[str, str, str],
             expert: int | None = None, module_prefix: str | None = None) -> None:
    """gate/up/down projections [F, H], [F, H], [H, F] -> fc1 [2F, H], fc2 [H, F]."""
    H = b.spec.hidden
    gate, up, down = names
    module_prefix = module_prefix or mc_prefix
    b.add(unit, i, f"{mc_prefix}linear_fc1.weight",
          [(f"{hf_prefix}{gate}.weight", (ffn, H)), (f"{hf_prefix}{up}.weight", (ffn, H))], (2 * ffn, H), "glu", "glu",
          expert, f"{module_prefix}linear_fc1.weight")
    b.add(unit, i, f"{mc_prefix}linear_fc2.weight", [(f"{hf_prefix}{down}.weight", (H, ffn))], (H, ffn), split="row",
          expert=expert, module=f"{module_prefix}linear_fc2.weight")


def _moe(b: _Builder, unit: str, i: int, p: str) -> None:
    s = b.spec
    mixtral = s.family == "mixtral"
    moe = f"{p}block_sparse_moe." if mixtral else f"{p}mlp."
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    b.add(unit, i, "mlp.router.weight", [(f"{moe}gate.weight", (s.num_experts, s.hidden))], (s.num_experts, s.hidden))
    if s.expert_bias:
        b.add(unit, i, "mlp.router.expert_bias", [(f"{moe}gate.e_score_correction_bias", (s.num_experts,))],
              (s.num_experts,), fp32=True)
    for e in range(s.num_experts):
        _glu_mlp(b, unit, i, f"{moe}experts.{e}.", "mlp.experts.experts.", s.moe_ffn, names, expert=e,
                 module_prefix="mlp.experts.local_experts.{expert}.")
    if s.shared_ffn:
        _glu_mlp(b, unit, i, f"{moe}shared_experts.", "mlp.shared_experts.", s.shared_ffn, names)


@lru_cache(maxsize=None)
def norm_keys(impl: str, moe: bool, mla: bool = False) -> dict[str, tuple[str, str]]:
    """The (state-dict name, dist-checkpoint key) of a layer's input and pre-MLP norm weights under the ``impl``
    layer spec, read from megatron-core's own spec (:func:`vespo_megatron.megatron.layer_keys.norm_keys`)."""
    from vespo_megatron.megatron.layer_keys import norm_keys as from_megatron_spec

    return from_megatron_spec(impl, bool(moe), bool(mla))


@lru_cache(maxsize=None)
def mla_norm_keys(impl: str) -> dict[str, tuple[str, str]]:
    """The (state-dict name, dist-checkpoint key) of the MLA q / kv latent norm weights under the ``impl`` layer spec
    (:func:`vespo_megatron.megatron.layer_keys.mla_norm_keys`)."""
    from vespo_megatron.megatron.layer_keys import mla_norm_keys as from_megatron_spec

    return from_megatron_spec(impl)


@lru_cache(maxsize=8)
def units(spec: ModelSpec) -> tuple[Unit, ...]:
    """The conversion units of ``spec`` in order: embedding, layer 0 … layer L-1, head (final norm + output layer)."""
    b = _Builder(spec)
    H, Vp, V = spec.hidden, spec.padded_vocab_size, spec.vocab_size
    b.add("embedding", None, "embedding.word_embeddings.weight", [(EMBEDDING, (V, H))], (Vp, H), "vocab", "vocab")
    for i in range(spec.num_layers):
        unit, p = f"layer {i}", f"model.layers.{i}."
        norms = norm_keys(spec.transformer_impl, spec.moe_layers[i], spec.mla)
        name, key = norms["input_layernorm"]
        b.add(unit, i, key, [(f"{p}input_layernorm.weight", (H,))], (H,), module=name)
        (_mla_attention if spec.mla else _attention)(b, unit, i, p)
        name, key = norms["pre_mlp_layernorm"]
        b.add(unit, i, key, [(f"{p}post_attention_layernorm.weight", (H,))], (H,), module=name)
        if spec.moe_layers[i]:
            _moe(b, unit, i, p)
        else:
            _glu_mlp(b, unit, i, f"{p}mlp.", "mlp.", spec.ffn, ("gate_proj", "up_proj", "down_proj"))
    b.add("head", None, "decoder.final_layernorm.weight", [("model.norm.weight", (H,))], (H,))
    if not spec.tied:
        b.add("head", None, "output_layer.weight", [(LM_HEAD, (V, H))], (Vp, H), "vocab", "vocab")
    grouped: dict[str, list[Rule]] = {}
    for rule in b.rules:
        grouped.setdefault(rule.unit, []).append(rule)
    return tuple(Unit(name, tuple(rules)) for name, rules in grouped.items())


def rules(spec: ModelSpec) -> tuple[Rule, ...]:
    """Every rule of ``spec``, in unit order."""
    return tuple(rule for unit in units(spec) for rule in unit.rules)


@lru_cache(maxsize=8)
def global_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Megatron dist-checkpoint key -> global shape."""
    return {rule.key: rule.global_shape for rule in rules(spec)}


@lru_cache(maxsize=8)
def rules_by_key(spec: ModelSpec) -> dict[str, tuple[Rule, ...]]:
    """Megatron key -> its rules (one per leading-axis position that has one)."""
    out: dict[str, list[Rule]] = {}
    for rule in rules(spec):
        out.setdefault(rule.key, []).append(rule)
    return {key: tuple(group) for key, group in out.items()}


_LINEAR_WEIGHTS = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight",
                   "linear_q_down_proj.weight", "linear_q_up_proj.weight",
                   "linear_kv_down_proj.weight", "linear_kv_up_proj.weight")


def extra_state_key(rule: Rule) -> str | None:
    """The unique key of the ``_extra_state`` object Megatron keeps for the linear layer of ``rule`` (None: none).

    Megatron saves one such ShardedObject per linear layer (``[None]`` without Transformer Engine), keyed
    ``<module>._extra_state/shard_<offsets>_<shape>`` over the layer/expert axes (``shard_0_1`` when there are none).
    """
    if not rule.key.endswith(_LINEAR_WEIGHTS) or rule.key.startswith("output_layer."):
        return None
    offsets, shape = (rule.index, rule.axes) if rule.index else ((0,), (1,))
    base = rule.key[: -len("weight")] + "_extra_state"
    return f"{base}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"


RowRanges = tuple[tuple[int, int], ...]


def hf_rows(spec: ModelSpec, rule: Rule, emit_tied_lm_head: bool = False) -> list[tuple[str, tuple[int, ...], RowRanges]]:
    """(HF name, HF shape, row ranges) of the Megatron tensor [rule.shape]: each HF tensor is the concatenation of the
    rows [start, end) along dim 0 of the Megatron tensor, in order (the inverse of :func:`to_mcore`).

    qkv [ng·(hpg+2)·d, *]: q = rows g·b … g·b + hpg·d of every group g (b = (hpg+2)·d), k and v the next d rows of
    each group; fc1 [2F, *]: gate rows [0, F), up [F, 2F); padded vocabulary [Vp, H]: rows [0, V).
    """
    rows = rule.shape[0]
    if rule.op == "qkv":
        d, ng = spec.head_dim, spec.num_kv_heads
        q = (spec.num_heads // ng) * d
        block = q + 2 * d
        ranges = tuple(tuple((g * block + a, g * block + b) for g in range(ng)) for a, b in ((0, q), (q, q + d), (q + d, block)))
    elif rule.op == "glu":
        ranges = (((0, rows // 2),), ((rows // 2, rows),))
    elif rule.op == "vocab":
        ranges = (((0, spec.vocab_size),),)
    else:
        ranges = (((0, rows),),)
    out = [(name, shape, _merged(r)) for name, shape, r in zip(rule.hf, rule.hf_shapes, ranges)]
    if emit_tied_lm_head and spec.tied and rule.hf == (EMBEDDING,):
        out.append((LM_HEAD, *out[0][1:]))
    return out


def _merged(ranges: RowRanges) -> RowRanges:
    """Adjacent ranges joined (q of a single kv group is one range)."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def placements(spec: ModelSpec, rule: Rule) -> list[tuple[int, int, int, int]]:
    """(j, source row, Megatron row, rows): HF tensor j's rows [source row, + rows) go to the Megatron rows
    [Megatron row, + rows) — :func:`hf_rows` seen from the HF side. Rows no placement covers are the vocabulary
    padding (zero), at the end."""
    out = []
    for j, (_, _, ranges) in enumerate(hf_rows(spec, rule)):
        row = 0
        for a, b in ranges:
            out.append((j, row, a, b - a))
            row += b - a
    return out


def to_mcore(spec: ModelSpec, rule: Rule, hf: list[torch.Tensor]) -> torch.Tensor:
    """The Megatron tensor [rule.shape] made from the rule's HF tensors (in ``rule.hf`` order), see :func:`placements`."""
    moves = placements(spec, rule)
    if moves == [(0, 0, 0, rule.shape[0])]:
        return hf[0]
    out = hf[0].new_empty(rule.shape)
    for j, src, dst, rows in moves:
        out[dst:dst + rows] = hf[j][src:src + rows]
    covered = sum(rows for *_, rows in moves)
    out[covered:] = 0
    return out


def to_hf(spec: ModelSpec, rule: Rule, tensor: torch.Tensor, emit_tied_lm_head: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of the Megatron tensor [rule.shape] (see :func:`hf_rows`): views of its rows where one
    range suffices; the tied embedding emitted as lm_head is a copy (safetensors refuses tensors that share memory)."""
    pairs = []
    for name, _, ranges in hf_rows(spec, rule, emit_tied_lm_head):
        part = torch.cat([tensor[a:b] for a, b in ranges]) if len(ranges) > 1 else tensor[ranges[0][0]:ranges[0][1]]
        pairs.append((name, part if name in rule.hf else part.clone()))
    return pairs
