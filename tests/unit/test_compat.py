"""The CPU/version shims: each applies to the installed megatron-core, and its upstream code is unchanged."""
from __future__ import annotations

import pytest
import torch
from packaging.specifiers import SpecifierSet

from vespo_megatron.megatron import compat


@pytest.mark.parametrize("shim", compat.SHIMS, ids=lambda s: s.name)
def test_upstream_code_unchanged(shim):
    """A fingerprint mismatch means megatron-core changed the code this shim replaces: re-check the shim.
    Measured after install(): a shim keeps the upstream code reachable (``__wrapped__``)."""
    compat.install()
    assert compat.megatron_version() in SpecifierSet(shim.versions), (shim.name, compat.megatron_version())
    assert compat.source_fingerprint(shim.targets) == shim.fingerprint, shim.name


def test_install_applies_every_cpu_shim_once():
    applied = compat.install()
    assert applied == [s.name for s in compat.SHIMS]  # this machine has no CUDA
    assert compat.install() == applied  # idempotent
    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()


def test_rng_tracker_runs_on_cpu_generator():
    from megatron.core.tensor_parallel import random

    compat.install()
    state = random._get_cuda_rng_state()
    a = torch.rand(3)
    random._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_cuda_literals_become_cpu_inside_the_mode():
    with compat.CudaToCpuMode():
        x = torch.zeros(2, device="cuda")
        assert x.device.type == "cpu"
        assert x.cuda() is x and x.to("cuda") is x


def test_alltoall_splits_become_numpy():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    compat.install()
    out = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert out.tolist() == [1, 2] and not torch.is_tensor(out)
    assert moe_utils.maybe_move_tensor_to_cpu is token_dispatcher.maybe_move_tensor_to_cpu
    assert moe_utils.te_general_gemm is None


def test_fingerprint_detects_a_change(monkeypatch):
    shim = compat.SHIMS[0]
    original = compat.source_fingerprint(shim.targets)
    monkeypatch.setattr(compat.inspect, "getsource", lambda obj: "changed upstream code")
    assert compat.source_fingerprint(shim.targets) != original
