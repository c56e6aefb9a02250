"""Every shim Megatron-Core needs on CPU + gloo (and across its versions), registered in one table (:data:`SHIMS`).

Each shim is a :class:`Shim` with the upstream objects it replaces or works around (``targets``) and, per
megatron-core release line it applies to, a fingerprint of their source there (``fingerprints``: PEP 440 specifier ->
sha256[:16]); a release outside every specifier gets no shim. ``tests/unit/test_compat.py`` recomputes the fingerprint
of the installed release, so a shim whose upstream code changed fails a test instead of silently misbehaving. A new
release line gets its entry only after its code under the targets was read again.

``install()`` is idempotent. The CUDA shims are only installed when torch has no usable CUDA device: on a GPU machine
only the version-bug shims apply.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from vespo_megatron.megatron.device import use_cpu
from vespo_megatron.megatron.optimizer_shims import (SCHEDULES, l2_norm_in_grad_dtype, torch_adam_state,
                                                     wrap_optimizers, wrap_schedules)

logger = logging.getLogger(__name__)

SUPPORTED = ">=0.16,<0.20"  # the megatron-core releases this project is built and tested against (setup.py)


@dataclass(frozen=True)
class Shim:
    """One workaround: ``apply()`` is run when megatron-core's version is in one of ``fingerprints``' specifiers
    (and ``cpu_only`` holds)."""

    name: str
    cpu_only: bool
    targets: tuple[str, ...]  # "module:qualname" of the upstream code the shim replaces or relies on
    fingerprints: Mapping[str, str]  # megatron-core specifier -> sha256[:16] of the targets' source in those releases
    apply: Callable[[], None]

    def applies_to(self, version: Version) -> bool:
        return fingerprint_for(self.fingerprints, version) is not None


def fingerprint_for(fingerprints: Mapping[str, str], version: Version) -> Optional[str]:
    """The fingerprint recorded for ``version`` (None: no entry). Entries must not overlap.

    Args:
        fingerprints: PEP 440 specifier of megatron-core releases -> fingerprint measured on them.
        version: a megatron-core version.
    Returns:
        The fingerprint of the one matching entry, or None.
    """
    matches = [fp for spec, fp in fingerprints.items() if version in SpecifierSet(spec)]
    if len(matches) > 1:
        raise ValueError(f"fingerprint table {dict(fingerprints)}: several entries match megatron-core {version}")
    return matches[0] if matches else None


def megatron_version() -> Version:
    from megatron.core import package_info

    return Version(Version(package_info.__version__).public)  # without the "+<commit>" a git checkout appends


def resolve(target: str) -> object:
    module, _, qualname = target.partition(":")
    obj: object = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def source_fingerprint(targets: tuple[str, ...]) -> str:
    """sha256 (first 16 hex digits) of the concatenated source of the targets."""
    digest = hashlib.sha256()
    for target in targets:
        obj = resolve(target)
        digest.update(inspect.getsource(getattr(obj, "__wrapped__", obj)).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- CUDA on a CPU build
class _NullStream:
    """Stands in for torch.cuda.Stream/Event on CPU: everything is synchronous already."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream: object) -> None:
        pass

    def wait_event(self, event: object) -> None:
        pass

    def record_event(self, event: object = None) -> "_NullStream":
        return self

    def record(self, stream: object = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


def _patch_torch_cuda() -> None:
    """torch.cuda calls that megatron makes as plumbing (device ids, streams, RNG, sync) become CPU no-ops."""
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda device=None: _NULL_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.random.get_rng_state = cuda.get_rng_state
    # not torch.manual_seed: that calls torch.cuda.manual_seed_all, which would recurse into this patch
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


def _patch_rng_tracker() -> None:
    """Megatron's model-parallel RNG tracker keeps CUDA generator states; on CPU it keeps CPU generator states."""
    from megatron.core.tensor_parallel import random

    if hasattr(random._get_cuda_rng_state, "__wrapped__"):
        return

    def get_state(device: object = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    get_state.__wrapped__ = random._get_cuda_rng_state  # fingerprints read the upstream code, patched or not
    set_state.__wrapped__ = random._set_cuda_rng_state
    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state


# -------------------------------------------------------------------------------------------- megatron-core bugs
def _define_te_general_gemm() -> None:
    """moe_utils references ``te_general_gemm`` that it only defines when Transformer Engine imports (GPU bug too)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _splits_as_numpy() -> None:
    """The all-to-all dispatcher needs numpy split sizes; upstream only converts CUDA tensors."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu
    if getattr(original, "_vespo_cpu", False):
        return

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._vespo_cpu = True
    maybe_move_tensor_to_cpu.__wrapped__ = original
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


SHIMS: tuple[Shim, ...] = (
    Shim(
        "torch-cuda-plumbing", True,
        ("megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
         "megatron.core.pipeline_parallel.p2p_communication:P2PCommunicator._communicate"),
        {"==0.16.*": "674c62038b2f4fbc", "==0.17.*": "674c62038b2f4fbc",
         "==0.18.*": "674c62038b2f4fbc", "==0.19.*": "674c62038b2f4fbc"},
        _patch_torch_cuda,
    ),
    Shim(
        "rng-tracker-on-cpu", True,
        ("megatron.core.tensor_parallel.random:_get_cuda_rng_state",
         "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
         "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add"),
        {"==0.16.*": "1902173cb4629e96", "==0.17.*": "1902173cb4629e96",
         "==0.18.*": "1902173cb4629e96", "==0.19.*": "1902173cb4629e96"},
        _patch_rng_tracker,
    ),
    Shim(  # 0.17 backward_step lost model_type, 0.18 paged_stash_reset, 0.19 _build_default_pg_collection: the
        # device="cuda" literals stay in every schedule of every line, all under the mode
        "schedules-cuda-literals", True,
        tuple(f"megatron.core.pipeline_parallel.schedules:{name}" for name in SCHEDULES),
        {"==0.16.*": "2d5eea4b416691f9", "==0.17.*": "17b7ca7cd0075bd4",
         "==0.18.*": "0d4315d83a4f2463", "==0.19.*": "f66404d65498eb13"},
        wrap_schedules,
    ),
    Shim(  # 0.17 clip allocates its CUDA buffer on every call and takes tensor norms, 0.18 emerging optimizers, 0.19
        # grad-norm groups (has_grad_norm_group allocates on cuda): all inside the wrapped calls
        "optimizer-cuda-literals", True,
        ("megatron.core.optimizer:get_megatron_optimizer",
         "megatron.core.optimizer.optimizer:FP32Optimizer.__init__",
         "megatron.core.optimizer.optimizer:FP32Optimizer.step",
         "megatron.core.optimizer.optimizer:MixedPrecisionOptimizer.step",
         "megatron.core.optimizer.optimizer:MixedPrecisionOptimizer.__init__",
         "megatron.core.optimizer.optimizer:ChainedOptimizer.step",
         "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32"),
        {"==0.16.*": "339934591199c12b", "==0.17.*": "ab2f00415b685524",
         "==0.18.*": "763d11c8cf6ded5d", "==0.19.*": "34a77e5b5be15bd7"},
        wrap_optimizers,
    ),
    Shim(
        "grad-norm-in-grad-dtype", True,
        ("megatron.core.utils:local_multi_tensor_l2_norm",
         "megatron.core.optimizer.clip_grads:get_grad_norm_fp32"),
        {"==0.16.*": "50c72014a8c15f34", "==0.17.*": "57e778a1b3e2dc52",
         "==0.18.*": "e816d110570a2b96", "==0.19.*": "58725eabc1c17725"},
        l2_norm_in_grad_dtype,
    ),
    Shim(
        "distributed-optimizer-torch-adam-state", False,
        ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.state_dict",
         "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
         "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.sharded_state_dict"),
        {"==0.16.*": "513183198e95109b", "==0.17.*": "513183198e95109b",
         "==0.18.*": "ac4fb66815a3e1ce", "==0.19.*": "82ed20c8e0604fb5"},
        torch_adam_state,
    ),
    Shim(  # fixed upstream in 0.17.0: moe_utils defines te_general_gemm = None without Transformer Engine
        "te-general-gemm-undefined", False,
        ("megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction.forward",),
        {"==0.16.*": "dcba4f9f02b30a36"},
        _define_te_general_gemm,
    ),
    Shim(
        "alltoall-splits-numpy", True,
        ("megatron.core.transformer.moe.moe_utils:maybe_move_tensor_to_cpu",),
        {"==0.16.*": "8fc5847a887d7319", "==0.17.*": "8fc5847a887d7319",
         "==0.18.*": "8fc5847a887d7319", "==0.19.*": "8fc5847a887d7319"},
        _splits_as_numpy,
    ),
)

_installed: list[str] = []


def install() -> list[str]:
    """Apply every shim that matches this machine and megatron-core version; returns the names applied."""
    if _installed:
        return list(_installed)
    on_cpu = use_cpu()
    version = megatron_version()
    if version not in SpecifierSet(SUPPORTED):
        logger.warning("megatron-core %s is outside the supported range %s: no shim is known for it", version,
                       SUPPORTED)
    for shim in SHIMS:
        if shim.cpu_only and not on_cpu:
            continue
        if not shim.applies_to(version):
            continue
        shim.apply()
        _installed.append(shim.name)
    return list(_installed)


# ------------------------------------------------------------------ the TE layer spec read without Transformer Engine
# get_gpt_layer_with_transformer_engine_spec builds its spec from ``backend = TESpecProvider()``, a name that only
# exists when Transformer Engine imports. To read that spec's structure and key maps without TE (layer_keys), the name
# is bound to a stand-in provider for the duration of one call. Fingerprint: tests/unit/test_layer_keys.py.
TE_SPEC_TARGETS = ("megatron.core.models.gpt.gpt_layer_specs:get_gpt_layer_with_transformer_engine_spec",)
TE_SPEC_FINGERPRINTS = {  # release line -> sha256[:16] of TE_SPEC_TARGETS (0.17 binds TESpecProvider = None without TE)
    "==0.16.*": "58e023a69771b58a",
    ">=0.17,<0.20": "697ef4e53733eab8",
}


@contextlib.contextmanager
def te_spec_provider(provider: type):
    """Within the block, ``get_gpt_layer_with_transformer_engine_spec`` uses ``provider`` as its TE backend (only
    when Transformer Engine is absent; with TE the real provider stays)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if gpt_layer_specs.HAVE_TE:
        yield
        return
    absent = object()
    previous = getattr(gpt_layer_specs, "TESpecProvider", absent)  # 0.16: unbound; 0.17+: None
    gpt_layer_specs.TESpecProvider = provider
    try:
        yield
    finally:
        if previous is absent:
            del gpt_layer_specs.TESpecProvider
        else:
            gpt_layer_specs.TESpecProvider = previous
