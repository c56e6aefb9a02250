"""The dist-checkpoint keys of a decoder layer's two norms, as Megatron-Core's own layer specs declare them.

A GPT decoder layer has an input norm (before attention) and a pre-MLP norm. Where the layer spec leaves a norm out
(``IdentityOp``) and the linear after it is the backend's layer-norm linear, the norm's weight is that linear's
``layer_norm_weight``; otherwise it is ``{norm}.weight``. The layer spec's ``sharded_state_dict_keys_map`` then renames
the keys by prefix, as ``TransformerLayer.sharded_state_dict`` does (megatron's own ``apply_prefix_mapping``).
For megatron-core 0.16 this gives:

- ``local`` (``get_gpt_layer_local_spec``): both norms renamed into the linears' keys,
  ``self_attention.linear_qkv.layer_norm_weight`` and ``mlp.linear_fc1.layer_norm_weight``, on dense and MoE layers;
- ``transformer_engine`` (``get_gpt_layer_with_transformer_engine_spec``): the input norm fused into ``linear_qkv``;
  the pre-MLP norm fused into ``mlp.linear_fc1`` on dense layers, a separate ``pre_mlp_layernorm.weight`` on MoE
  layers (MoE has no fc1 to fuse it into).

With multi-latent attention (MLA, ``multi_latent_attention=True``) the input norm stays ``input_layernorm.weight``
(no layer-norm linear follows it) under both specs; the pre-MLP norm is ``pre_mlp_layernorm.weight`` under the local
spec (which has no key map for MLA) and as above under the TE spec. The MLA latent norms (:func:`mla_norm_keys`) are
``self_attention.q_layernorm.weight`` / ``kv_layernorm.weight`` under the local spec, fused into the up projections
(``self_attention.linear_q_up_proj.layer_norm_weight`` / ``linear_kv_up_proj.layer_norm_weight``) under the TE spec.

Every other key (attention, router, experts, shared experts, embeddings, head) is the same under both specs.
Without Transformer Engine installed, the TE spec is built with :class:`StandInTEProvider` (its layer classes are
placeholders; nothing is instantiated): only the spec's structure and key maps are read.
"""
from __future__ import annotations

from functools import lru_cache, partial
from typing import Optional

from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.utils import apply_prefix_mapping
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from vespo_megatron.megatron import compat

IMPLS = ("local", "transformer_engine")  # Megatron-LM's --transformer-impl choices
NORMS = {"input_layernorm": "self_attention.linear_qkv", "pre_mlp_layernorm": "mlp.linear_fc1"}  # norm -> next linear
MLA_NORMS = {"q_layernorm": "linear_q_up_proj", "kv_layernorm": "linear_kv_up_proj"}  # MLA latent norm -> next linear
_EXPERTS = 8  # any expert count gives the MoE spec


def _placeholder(name: str) -> type:
    return type(f"{name}StandIn", (), {"__doc__": f"stand-in for Transformer Engine's {name} (never built)"})


class StandInTEProvider(BackendSpecProvider):
    """What Megatron's ``TESpecProvider`` answers, with placeholder classes: a layer-norm linear fused into the
    column-parallel linears (``fuse_layernorm_and_linear``), separate norms elsewhere."""

    _linear = _placeholder("TELinear")
    _column = _placeholder("TEColumnParallelLinear")
    _row = _placeholder("TERowParallelLinear")
    _norm_linear = _placeholder("TELayerNormColumnParallelLinear")
    _norm = _placeholder("TENorm")
    _attention = _placeholder("TEDotProductAttention")

    def linear(self) -> type:
        return self._linear

    def column_parallel_linear(self) -> type:
        return self._column

    def row_parallel_linear(self) -> type:
        return self._row

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> Optional[type]:
        return self._norm_linear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False) -> type:
        return self._norm  # has_residual: megatron-core 0.19

    def core_attention(self) -> type:
        return self._attention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: Optional[bool] = None):
        """0.16 asks with two flags for (module, submodules); 0.17+ with one flag for an experts builder."""
        submodules = MLPSubmodules(linear_fc1=self._column, linear_fc2=self._row)
        if moe_use_legacy_grouped_gemm is not None:
            return SequentialMLP, submodules
        return partial(SequentialMLP, submodules=submodules)

    def activation_func(self) -> type:
        return None


def layer_spec(impl: str, moe: bool, mla: bool = False) -> tuple[ModuleSpec, BackendSpecProvider]:
    """(Megatron-Core's GPT layer spec for ``impl``, its backend provider) of a dense or MoE layer with q/k norm
    (with ``mla``: multi-latent attention with its latent norms)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    kwargs = dict(num_experts=_EXPERTS if moe else None, moe_grouped_gemm=False, qk_layernorm=True,
                  multi_latent_attention=mla)
    if impl == "local":
        return specs.get_gpt_layer_local_spec(normalization="RMSNorm", **kwargs), LocalSpecProvider()
    if impl != "transformer_engine":
        raise ValueError(f"--transformer-impl {impl!r}: choose one of {', '.join(IMPLS)}")
    if specs.HAVE_TE:
        return specs.get_gpt_layer_with_transformer_engine_spec(**kwargs), specs.TESpecProvider()
    with compat.te_spec_provider(StandInTEProvider):
        return specs.get_gpt_layer_with_transformer_engine_spec(**kwargs), StandInTEProvider()


def _submodules(spec) -> object:
    """The submodules of a layer-spec entry: a ModuleSpec's, or (megatron-core 0.19 MLP/MoE specs) the ``submodules``
    keyword of a ``functools.partial``."""
    if isinstance(spec, ModuleSpec):
        return spec.submodules
    return getattr(spec, "keywords", {}).get("submodules")


def _norm_key(impl: str, norm: str, norm_spec, linear: str, linear_spec, backend: BackendSpecProvider) -> str:
    """The key of ``norm``'s weight: ``{norm}.weight``, or ``{linear}.layer_norm_weight`` where the spec leaves the
    norm out and ``linear`` is the backend's layer-norm linear."""
    if norm_spec is not IdentityOp:
        return f"{norm}.weight"
    if linear_spec is not backend.column_parallel_layer_norm_linear():
        raise ValueError(f"{impl} spec: {norm} is left out, but {linear} is not a layer-norm linear ({linear_spec}); "
                         "megatron-core's layer spec changed")
    return f"{linear}.layer_norm_weight"


def _renamed(keys: dict[str, str], keys_map: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{norm: (state-dict name, dist-checkpoint key)}: each name renamed by the spec's key map."""
    objects = {name: ShardedObject(name, None, (1,), (0,)) for name in keys.values()}
    apply_prefix_mapping(objects, dict(keys_map))
    return {norm: (name, obj.key) for norm, (name, obj) in zip(keys, objects.items())}


@lru_cache(maxsize=None)
def norm_keys(impl: str, moe: bool, mla: bool = False) -> dict[str, tuple[str, str]]:
    """{"input_layernorm": (name, key), "pre_mlp_layernorm": (name, key)} of a dense (``moe`` False) or MoE layer of
    the ``impl`` spec (``mla``: with multi-latent attention): each norm weight's layer-relative state-dict name and
    dist-checkpoint key."""
    spec, backend = layer_spec(impl, moe, mla)
    sub = spec.submodules
    linears = {"input_layernorm": getattr(sub.self_attention.submodules, "linear_qkv", None),
               "pre_mlp_layernorm": getattr(_submodules(sub.mlp), "linear_fc1", None)}
    kind = f"{impl} ({'MoE' if moe else 'dense'}{', MLA' if mla else ''} layer)"
    keys = {norm: _norm_key(kind, norm, getattr(sub, norm), linear, linears[norm], backend)
            for norm, linear in NORMS.items()}
    return _renamed(keys, sub.sharded_state_dict_keys_map)


@lru_cache(maxsize=None)
def mla_norm_keys(impl: str) -> dict[str, tuple[str, str]]:
    """{"q_layernorm": (name, key), "kv_layernorm": (name, key)} of the MLA latent norms (the q latent [q_lora_rank]
    and the kv latent [kv_lora_rank]) under the ``impl`` spec: layer-relative state-dict name and key."""
    spec, backend = layer_spec(impl, False, True)
    attention = spec.submodules.self_attention.submodules
    keys = {norm: "self_attention." + _norm_key(f"{impl} (MLA)", norm, getattr(attention, norm), linear,
                                                getattr(attention, linear), backend)
            for norm, linear in MLA_NORMS.items()}
    return _renamed(keys, spec.submodules.sharded_state_dict_keys_map)
