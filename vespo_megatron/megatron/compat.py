"""Every shim Megatron-Core needs on CPU + gloo (and across its versions), in one module.

Each shim is a :class:`Shim` with the megatron-core version range it applies to, the upstream objects it replaces
or works around (``targets``) and a fingerprint of their source. ``tests/unit/test_compat.py`` recomputes the
fingerprints, so a shim whose upstream code changed fails a test instead of silently misbehaving.

``install()`` is idempotent. The CUDA shims are only installed when torch has no usable CUDA device: on a GPU machine
only the version-bug shims apply.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version


@dataclass(frozen=True)
class Shim:
    """One workaround: ``apply()`` is run when megatron-core's version is in ``versions`` (and ``cpu_only`` holds)."""

    name: str
    versions: str  # PEP 440 specifier of megatron-core versions
    cpu_only: bool
    targets: tuple[str, ...]  # "module:qualname" of the upstream code the shim replaces or relies on
    fingerprint: str  # sha256[:16] of the targets' source, as measured on the version range above
    apply: Callable[[], None]


def megatron_version() -> Version:
    from megatron.core import package_info

    return Version(package_info.__version__)


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

    def get_state(device: object = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites ``device="cuda"`` literals and ``.cuda()`` calls to CPU inside megatron's schedules."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and args[1:] and isinstance(args[1], (str, torch.device)):
            if torch.device(args[1]).type == "cuda":
                return args[0]
        return func(*args, **kwargs)


def _wrap_schedules() -> None:
    """The pipeline schedules allocate ``torch.zeros(..., device="cuda")``; run each of them under CudaToCpuMode."""
    from megatron.core.pipeline_parallel import schedules

    for name in _SCHEDULES:
        fn = getattr(schedules, name)
        if getattr(fn, "_vespo_cpu", False):
            continue

        def wrapped(*args, __fn=fn, **kwargs):
            with CudaToCpuMode():
                return __fn(*args, **kwargs)

        wrapped._vespo_cpu = True
        wrapped.__wrapped__ = fn
        setattr(schedules, name, wrapped)


_SCHEDULES = (
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
)


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
        "torch-cuda-plumbing", ">=0.16,<0.17", True,
        ("megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
         "megatron.core.pipeline_parallel.p2p_communication:P2PCommunicator._communicate"),
        "674c62038b2f4fbc", _patch_torch_cuda,
    ),
    Shim(
        "rng-tracker-on-cpu", ">=0.16,<0.17", True,
        ("megatron.core.tensor_parallel.random:_get_cuda_rng_state",
         "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
         "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add"),
        "1902173cb4629e96", _patch_rng_tracker,
    ),
    Shim(
        "schedules-cuda-literals", ">=0.16,<0.17", True,
        tuple(f"megatron.core.pipeline_parallel.schedules:{name}" for name in _SCHEDULES),
        "2d5eea4b416691f9", _wrap_schedules,
    ),
    Shim(
        "te-general-gemm-undefined", ">=0.16,<0.17", False,
        ("megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction.forward",),
        "dcba4f9f02b30a36", _define_te_general_gemm,
    ),
    Shim(
        "alltoall-splits-numpy", ">=0.16,<0.17", True,
        ("megatron.core.transformer.moe.moe_utils:maybe_move_tensor_to_cpu",),
        "8fc5847a887d7319", _splits_as_numpy,
    ),
)

_installed: list[str] = []


def install() -> list[str]:
    """Apply every shim that matches this machine and megatron-core version; returns the names applied."""
    if _installed:
        return list(_installed)
    on_cpu = not torch.cuda.is_available()
    version = megatron_version()
    for shim in SHIMS:
        if shim.cpu_only and not on_cpu:
            continue
        if version not in SpecifierSet(shim.versions):
            continue
        shim.apply()
        _installed.append(shim.name)
    return list(_installed)
