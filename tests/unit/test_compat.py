"""The CPU/version shims: each applies to the installed megatron-core, and its upstream code is unchanged."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from vespo_megatron.megatron import compat
from vespo_megatron.megatron.optimizer_shims import CudaToCpuMode


INSTALLED = compat.megatron_version()
APPLYING = [s for s in compat.SHIMS if s.applies_to(INSTALLED)]


@pytest.mark.parametrize("shim", APPLYING, ids=lambda s: s.name)
def test_upstream_code_unchanged(shim):
    """A fingerprint mismatch means megatron-core changed the code this shim replaces: re-check the shim.
    Measured after install(): a shim keeps the upstream code reachable (``__wrapped__``)."""
    compat.install()
    expected = compat.fingerprint_for(shim.fingerprints, INSTALLED)
    assert compat.source_fingerprint(shim.targets) == expected, (shim.name, str(INSTALLED))


@pytest.mark.parametrize("shim", compat.SHIMS, ids=lambda s: s.name)
def test_fingerprint_tables_cover_the_supported_releases(shim):
    """Every shim names, per release line, the code it was checked against: entries never overlap, every release
    published in the supported range (0.16.0 ... 0.19.2) has its line's entry wherever the shim is still needed, and
    no entry reaches past the supported range (a new line gets its entry once its code was read)."""
    releases = [Version(v) for v in ("0.16.0", "0.16.1", "0.17.0", "0.17.1", "0.18.0", "0.18.2", "0.19.0", "0.19.2")]
    for version in releases:
        compat.fingerprint_for(shim.fingerprints, version)  # raises on overlapping entries
    assert not shim.applies_to(Version("0.20.0")) and not shim.applies_to(Version("0.15.3"))
    covered = [shim.applies_to(v) for v in releases]
    assert covered[0], f"{shim.name}: no entry for 0.16"
    assert covered == sorted(covered, reverse=True), f"{shim.name}: a shim is dropped for good, not for one line"
    assert all(len(fp) == 16 and int(fp, 16) >= 0 for fp in shim.fingerprints.values()), shim.fingerprints


def test_install_applies_exactly_the_shims_of_this_release():
    applied = compat.install()
    assert applied == [s.name for s in APPLYING]  # this machine has no CUDA
    assert compat.install() == applied  # idempotent
    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()


def test_dropped_te_general_gemm_shim_is_not_needed():
    """Fixed upstream from 0.17.0 (moe_utils defines it as None without Transformer Engine): the shim stops there."""
    from megatron.core.transformer.moe import moe_utils

    shim = next(s for s in compat.SHIMS if s.name == "te-general-gemm-undefined")
    assert shim.applies_to(INSTALLED) == (INSTALLED < Version("0.17"))
    compat.install()
    assert moe_utils.te_general_gemm is None


def test_fingerprint_lookup_by_version():
    table = {"==0.16.*": "a" * 16, "==0.19.*": "b" * 16}
    assert compat.fingerprint_for(table, Version("0.16.1")) == "a" * 16
    assert compat.fingerprint_for(table, Version("0.19.2")) == "b" * 16
    assert compat.fingerprint_for(table, Version("0.17.1")) is None
    with pytest.raises(ValueError, match="several entries match megatron-core 0.16.1"):
        compat.fingerprint_for({**table, ">=0.16,<0.17": "c" * 16}, Version("0.16.1"))


def test_supported_range_is_the_one_setup_py_installs():
    setup_py = (Path(__file__).parents[2] / "setup.py").read_text()
    assert re.findall(r'"megatron-core([^"]*)"', setup_py) == [compat.SUPPORTED]


def test_version_ignores_the_local_label():
    """Installed inside a git checkout, megatron-core appends ``+<commit>`` to its version; ranges read the release."""
    assert not INSTALLED.local and INSTALLED in SpecifierSet(compat.SUPPORTED)


def test_rng_tracker_runs_on_cpu_generator():
    from megatron.core.tensor_parallel import random

    compat.install()
    state = random._get_cuda_rng_state()
    a = torch.rand(3)
    random._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_cuda_literals_become_cpu_inside_the_mode():
    with CudaToCpuMode():
        x = torch.zeros(2, device="cuda")
        assert x.device.type == "cpu"
        assert x.cuda() is x and x.to("cuda") is x


def test_alltoall_splits_become_numpy():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    compat.install()
    out = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert out.tolist() == [1, 2] and not torch.is_tensor(out)
    assert moe_utils.maybe_move_tensor_to_cpu is token_dispatcher.maybe_move_tensor_to_cpu


@pytest.mark.parametrize("as_tensor", [False, True])
def test_cpu_grad_clipping_by_hand(as_tensor):
    """max_norm 1, total norm 4 -> grads × 1/(4 + 1e-6); total norm 0.5 -> unchanged (float or tensor norm)."""
    from megatron.core.optimizer import optimizer as optimizer_module

    compat.install()
    for norm, coeff in ((4.0, 1.0 / (4.0 + 1e-6)), (0.5, 1.0)):
        param = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        param.grad = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
        total = torch.tensor(norm, dtype=torch.float64) if as_tensor else norm
        optimizer_module.clip_grad_by_total_norm_fp32([param], 1.0, total)
        torch.testing.assert_close(param.grad, torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) * coeff)


def test_fingerprint_detects_a_change(monkeypatch):
    shim = compat.SHIMS[0]
    original = compat.source_fingerprint(shim.targets)
    monkeypatch.setattr(compat.inspect, "getsource", lambda obj: "changed upstream code")
    assert compat.source_fingerprint(shim.targets) != original
