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


def layer_spec(impl: str, moe: bool) -> tuple[ModuleSpec, BackendSpecProvider]:
    """(Megatron-Core's GPT layer spec for ``impl``, its backend provider) of a dense or MoE layer with q/k norm."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    kwargs = dict(num_experts=_EXPERTS if moe else None, moe_grouped_gemm=False, qk_layernorm=True)
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


@lru_cache(maxsize=None)
def norm_keys(impl: str, moe: bool) -> dict[str, tuple[str, str]]:
    """{"input_layernorm": (name, key), "pre_mlp_layernorm": (name, key)} of a dense (``moe`` False) or MoE layer of
    the ``impl`` spec: each norm weight's layer-relative state-dict name and dist-checkpoint key."""
    spec, backend = layer_spec(impl, moe)
    sub = spec.submodules
    linears = {"input_layernorm": sub.self_attention.submodules.linear_qkv,
               "pre_mlp_layernorm": getattr(_submodules(sub.mlp), "linear_fc1", None)}
    objects = {}
    for norm, linear in NORMS.items():
        if getattr(sub, norm) is IdentityOp:
            if linears[norm] is not backend.column_parallel_layer_norm_linear():
                raise ValueError(f"{impl} spec ({'MoE' if moe else 'dense'} layer): {norm} is left out, but {linear} "
                                 f"is not a layer-norm linear ({linears[norm]}); megatron-core's layer spec changed")
            key = f"{linear}.layer_norm_weight"
        else:
            key = f"{norm}.weight"
        objects[key] = ShardedObject(key, None, (1,), (0,))
    apply_prefix_mapping(objects, dict(sub.sharded_state_dict_keys_map))
    return {norm: (name, obj.key) for norm, (name, obj) in zip(NORMS, objects.items())}
