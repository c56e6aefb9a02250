"""Shim bodies for Megatron-Core's optimizers and pipeline schedules on CPU + gloo, and for the torch-Adam state of
its distributed optimizer (registered, fingerprinted and installed by :mod:`vespo_megatron.megatron.compat`).

On CPU the schedules and optimizers run under :class:`CudaToCpuMode` (``device="cuda"`` literals and ``.cuda()`` go
to the CPU; ``tensor.type()`` answers CUDA type names); grad clipping and the grad norm have CPU versions that keep
the grads' dtype (fp64 exactness). ``torch_adam_state`` mends two upstream bugs of the distributed optimizer over
torch's Adam (no apex / Transformer Engine), on any device.
"""
from __future__ import annotations

import torch

SCHEDULES = (
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
)  # the pipeline schedules run under CudaToCpuMode on CPU

# Megatron's optimizers sort parameters by ``param.type()`` names that only CUDA tensors have; on CPU, inside the
# wrapped calls, a tensor answers the CUDA name of its dtype. fp64 (the exactness tests' precision) answers as the
# full-precision kind, torch.cuda.FloatTensor: its main params are the params themselves, as for fp32, and
# ``.float()`` leaves an fp64 tensor as it is (as it leaves an fp32 one).
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float64: "torch.cuda.FloatTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float16: "torch.cuda.HalfTensor",
}


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites ``device="cuda"`` literals and ``.cuda()`` calls to CPU inside megatron's schedules and optimizers;
    ``tensor.type()`` answers the CUDA type name of the tensor's dtype, ``.float()`` keeps fp64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[args[0].dtype]
        if func is torch.Tensor.float and len(args) == 1 and not kwargs and args[0].dtype == torch.float64:
            return args[0]
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and args[1:] and isinstance(args[1], (str, torch.device)):
            if torch.device(args[1]).type == "cuda":
                return args[0]
        return func(*args, **kwargs)


def _under_cpu_mode(owner: object, names: tuple[str, ...]) -> None:
    """Replace ``owner.<name>`` (functions or methods) by wrappers that run them under CudaToCpuMode."""
    for name in names:
        fn = getattr(owner, name)
        if getattr(fn, "_vespo_cpu", False):
            continue

        def wrapped(*args, __fn=fn, **kwargs):
            with CudaToCpuMode():
                return __fn(*args, **kwargs)

        wrapped._vespo_cpu = True
        wrapped.__wrapped__ = fn
        setattr(owner, name, wrapped)


def wrap_schedules() -> None:
    """The pipeline schedules allocate ``torch.zeros(..., device="cuda")``; run each of them under CudaToCpuMode."""
    from megatron.core.pipeline_parallel import schedules

    _under_cpu_mode(schedules, SCHEDULES)


def wrap_optimizers() -> None:
    """Megatron's optimizers allocate ``device='cuda'`` tensors when built and stepped (scale, overflow buffers)."""
    import megatron.core.optimizer as optimizer
    from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer, MixedPrecisionOptimizer

    _under_cpu_mode(optimizer, ("get_megatron_optimizer",))
    _under_cpu_mode(ChainedOptimizer, ("step",))
    _under_cpu_mode(FP32Optimizer, ("step",))
    _under_cpu_mode(MixedPrecisionOptimizer, ("step",))
    _clip_grads_on_cpu()


def _clip_grads_on_cpu() -> None:
    """``clip_grad_by_total_norm_fp32`` asserts CUDA grads (and from 0.17 allocates a CUDA overflow buffer on every
    call); on CPU scale the grads by min(1, max_norm / (norm + 1e-6)). From 0.17 the norm may be a tensor."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as optimizer_module

    original = clip_grads.clip_grad_by_total_norm_fp32
    if getattr(original, "_vespo_cpu", False):
        return

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad: bool = False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        if any(g.is_cuda for g in grads):
            return original(parameters, max_norm, total_norm, use_decoupled_grad)
        coeff = max_norm / (total_norm + 1.0e-6)
        if torch.is_tensor(coeff):
            coeff = coeff.clamp_max(1.0)
        elif coeff >= 1.0:
            return
        for grad in grads:
            grad.mul_(coeff)

    clip_grad_by_total_norm_fp32._vespo_cpu = True
    clip_grad_by_total_norm_fp32.__wrapped__ = original
    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer_module.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def l2_norm_in_grad_dtype() -> None:
    """Without apex / Transformer Engine the grad norm is ``local_multi_tensor_l2_norm``, rounded to fp32; on CPU it
    keeps the grads' dtype, so an fp64 run's clipping (and the distributed optimizer's per-shard norms summed over
    ranks) are exact to fp64. Returns the norm as a [1] tensor, as upstream."""
    from megatron.core.optimizer import clip_grads

    original = clip_grads.l2_norm_impl
    if getattr(original, "_vespo_cpu", False) or getattr(original, "__name__", "") != "local_multi_tensor_l2_norm":
        return

    def local_multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        norms = [torch.linalg.vector_norm(t) for tensors in tensor_lists for t in tensors]
        dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
        return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms])).reshape(1), None

    local_multi_tensor_l2_norm._vespo_cpu = True
    local_multi_tensor_l2_norm.__wrapped__ = original
    clip_grads.l2_norm_impl = local_multi_tensor_l2_norm


def torch_adam_state() -> None:
    """Without apex / Transformer Engine the distributed optimizer wraps torch's Adam, whose per-param ``step``
    tensor ``DistributedOptimizer.state_dict`` / ``load_state_dict`` handle: (1) an optimizer that has not stepped yet
    (a run resuming from a checkpoint) has no ``step`` and ``state_dict`` asserts, so before its sharded state dict is
    requested for loading its Adam state is allocated (zeros of each main param's dtype, step 0; the checkpoint then
    overwrites it); (2) ``load_state_dict`` gives every param the SAME step tensor (which torch's Adam would increment
    once per param and step) and the param-state copy then writes the template's step into it; after loading, each
    param gets its own tensor holding the checkpoint's step (saved in every param group)."""
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    if getattr(cls.sharded_state_dict, "_vespo_cpu", False):
        return
    sharded_state_dict_upstream, load_state_dict_upstream = cls.sharded_state_dict, cls.load_state_dict

    def torch_adam(optimizer) -> bool:
        return not distrib_optimizer.HAVE_APEX_OR_TE and isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading: bool = False, *args, **kwargs):
        inner = self.optimizer
        if is_loading and torch_adam(inner) and not inner.state:
            for group in inner.param_groups:
                for param in group["params"]:
                    inner.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}
        return sharded_state_dict_upstream(self, model_sharded_state_dict or {}, is_loading, *args, **kwargs)

    def load_state_dict(self, state_dict) -> None:
        load_state_dict_upstream(self, state_dict)
        if torch_adam(self.optimizer):  # the checkpoint's step (saved in every param group) in a tensor per param
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    self.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))

    for fn, upstream in ((sharded_state_dict, sharded_state_dict_upstream),
                         (load_state_dict, load_state_dict_upstream)):
        fn._vespo_cpu = True
        fn.__wrapped__ = upstream
        setattr(cls, fn.__name__, fn)
