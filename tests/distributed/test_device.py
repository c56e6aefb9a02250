"""One device per rank: model, DDP grad buffers, micro-batches, log-probs and exported weights all on
``local_device()`` (the current CUDA device on a GPU machine, set from LOCAL_RANK; the CPU here)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.device_cases import placement
from vespo_megatron.megatron import compat
from vespo_megatron.megatron.parallel import spawn

pytestmark = pytest.mark.slow


def _assert_all_on(result: dict, device: str) -> None:
    assert result["local"] == device
    for key in ("params", "grad_buffers", "batch", "logp", "export"):
        assert result[key] == {device}, key
    assert result["cu_dtype"] == "torch.int32" and result["logp_dtype"] == {"torch.float32"}


def test_everything_on_the_cpu_with_the_cpu_shims():
    """CPU twin of test_everything_on_the_current_cuda_device."""
    result = spawn(placement, 1)[0]
    _assert_all_on(result, "cpu")
    assert result["use_cpu_initialization"]
    assert "torch-cuda-plumbing" in compat.install()


@pytest.mark.gpu
def test_everything_on_the_current_cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; the CPU equivalent is test_everything_on_the_cpu_with_the_cpu_shims")
    result = spawn(placement, 1)[0]
    _assert_all_on(result, "cuda:0")
    assert not result["use_cpu_initialization"]
    assert not any(s.cpu_only for s in compat.SHIMS if s.name in compat.install())
