"""The trainer with --kl-coef and --entropy-coef on the CPU engine: kl_loss and entropy_loss are logged; with π_ref =
the initial weights the KL of step 0's (only) update is exactly 0 and later steps' is not; a --ref-load of a training
save equal to the resumed policy gives KL 0 again; a reference that is not usable fails at start naming the flag."""
from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.test_train import _cfg, _hf_dir
from vespo_megatron.errors import UsageError
from vespo_megatron.train.run import preflight, run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REG = dict(kl_coef=0.1, entropy_coef=0.01, num_mini_batches=1, lr=1e-2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory.mktemp("hf"))


def test_kl_and_entropy_terms_are_trained_and_logged(hf_dir, tmp_path):
    history = run_training(_cfg(hf_dir, train_iters=2, save=str(tmp_path / "ckpt"), **REG), quiet=True)
    assert [it for it, _ in history] == [0, 1]
    first, second = history[0][1], history[1][1]
    assert first["kl_loss"] == 0.0  # π = π_ref exactly before the first update
    assert second["kl_loss"] > 0.0  # low_var_kl >= 0, and the policy moved
    assert all(np.isfinite(m["loss"]) and m["entropy_loss"] > 0.0 for _, m in history)
    assert abs(first["entropy_loss"] - first["entropy"]) <= 1e-6 * first["entropy"]  # token-mean of H_t

    # the saved policy as --ref-load and as --load: π = π_ref again at the resumed step's update
    resumed = run_training(_cfg(hf_dir, train_iters=3, load=str(tmp_path / "ckpt"), ref_load=str(tmp_path / "ckpt"),
                                kl_loss_type="k2", **REG), quiet=True)
    assert [it for it, _ in resumed] == [2] and resumed[0][1]["kl_loss"] == 0.0


@pytest.mark.parametrize("replay", ["r2", "off"])
def test_kl_is_zero_at_the_first_update_with_every_routing_replay(hf_dir, replay):
    """r2: π_ref routes live as π_old does in its recording pass; off: both route live (r3: the test above)."""
    history = run_training(_cfg(hf_dir, train_iters=1, routing_replay=replay, **REG), quiet=True)
    assert history[0][1]["kl_loss"] == 0.0 and history[0][1]["entropy_loss"] > 0.0


@pytest.mark.parametrize("change, message", [
    (dict(kl_coef=0.1, ref_load="{tmp}"), "--ref-load: .* neither a Megatron distributed checkpoint"),
    (dict(kl_coef=0.1, ref_load="{tmp}/missing"), "--ref-load: .* no such directory"),
    (dict(ref_load="{tmp}"), "--ref-load: the reference is used only by the KL term"),
    (dict(kl_coef=0.1, kl_loss_type="k4"), "--kl-loss-type: unknown type 'k4'"),
    (dict(kl_coef=-1.0), "--kl-coef: must be a finite number >= 0"),
])
def test_bad_regularizer_flags_fail_before_work(hf_dir, tmp_path, change, message):
    change = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in change.items()}
    with pytest.raises(UsageError, match=message):
        preflight(_cfg(hf_dir, **change))
