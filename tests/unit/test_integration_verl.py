"""VESPO in verl's policy-loss registry, against the real verl 0.9.1 code.

scripts/setup_env.sh installs verl 0.9.1 with --no-deps into .venv/verl-0.9.1 together with the light packages its
``verl.trainer.ppo.core_algos`` import needs (tensordict, pyvers, cloudpickle, orjson, omegaconf, antlr4, codetiming;
hydra-core for config instantiation). Stubbed: ``ray`` only, when it is not installed — ``verl/__init__`` imports
``verl.protocol``, which imports ray and names ``ray.ObjectRef`` in a class annotation; nothing on the policy-loss
path calls ray.

Every check runs in fp64: the registered function called the way verl's ``ppo_loss`` calls it equals
``compute_policy_loss`` (loss and gradient w.r.t. log_prob ≤ 1e-12) and an independent hand formula of the official
VESPO loss aggregated by verl's own ``agg_loss``, in every verl aggregation mode, with and without verl's own
token-level rollout-correction weights, with config None and with explicit hyper-parameters.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from vespo_megatron.objectives import compute_policy_loss

ROOT = Path(__file__).resolve().parents[2]
VERL_DIR = ROOT / ".venv" / "verl-0.9.1"
NAMES = ("vespo", "vespo-lin", "vespo-sqrt")
MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
EXPLICIT = {"k_pos": 1.5, "lambda_pos": 2.5, "k_neg": 2.5, "lambda_neg": 1.5}
GLOBAL_INFO = {"dp_size": 2, "batch_num_tokens": 61, "global_batch_size": 13, "loss_scale_factor": 7}
TIS_CAP = 2.0


def _add_verl_to_path() -> None:
    if importlib.util.find_spec("verl") is None:
        if not (VERL_DIR / ".complete").exists():
            pytest.fail(f"verl 0.9.1 is not installed in {VERL_DIR}: run scripts/setup_env.sh")
        sys.path.append(str(VERL_DIR))  # appended: verl's wheel ships a top-level `tests` package
    if importlib.util.find_spec("ray") is None and "ray" not in sys.modules:
        ray = types.ModuleType("ray")
        ray.ObjectRef = type("ObjectRef", (), {})
        sys.modules["ray"] = ray


@pytest.fixture(scope="module")
def verl():
    _add_verl_to_path()
    import verl as verl_pkg
    from verl.trainer.ppo import core_algos, rollout_corr_helper

    import vespo_megatron.integrations.verl as integration

    assert verl_pkg.__version__ == "0.9.1"
    return types.SimpleNamespace(core_algos=core_algos, rollout_corr_helper=rollout_corr_helper,
                                 integration=integration)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """6 sequences × 9 response slots (fp64): ragged masks, GRPO advantages of both signs and zero, staleness."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 3, 7, 1, 5, 8])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).to(torch.float64)
    log_prob = -(torch.rand(6, 9, generator=gen, dtype=torch.float64) * 3 + 0.05)
    old = (log_prob + 0.25 * torch.randn(6, 9, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    rollout = (old + 0.6 * torch.randn(6, 9, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    adv = torch.tensor([1.3, -0.7, 0.0, 2.1, -1.6, 0.4], dtype=torch.float64)[:, None] * mask
    return {"log_prob": log_prob, "old_log_prob": old, "rollout": rollout, "advantages": adv, "response_mask": mask}


def _verl_weights(verl, batch) -> torch.Tensor:
    """verl's own token-level TIS weights min(exp(clamp(old − μ, ±20)), 2) from its rollout-correction helper."""
    weights, _ = verl.rollout_corr_helper.compute_rollout_correction_weights(
        batch["old_log_prob"] - batch["rollout"], batch["response_mask"], rollout_is="token",
        rollout_is_threshold=TIS_CAP,
    )
    assert bool((weights == TIS_CAP).any()) and bool(((weights < 1) & (batch["response_mask"] > 0)).any())
    return weights


def _config(hparams: dict | None, info: dict | None):
    from omegaconf import OmegaConf

    if hparams is None and info is None:
        return None
    return OmegaConf.create({"policy_loss": {"loss_mode": "vespo", "vespo": hparams or {}},
                             "global_batch_info": info or {}})


def _call_verl(verl, name, batch, mode, config, weights):
    """The registered loss, looked up and called with keywords exactly as verl's ppo_loss does."""
    log_prob = batch["log_prob"].clone().requires_grad_(True)
    loss, metrics = verl.core_algos.get_policy_loss_fn(name)(
        old_log_prob=batch["old_log_prob"], log_prob=log_prob, advantages=batch["advantages"],
        response_mask=batch["response_mask"].bool(), loss_agg_mode=mode, config=config,
        rollout_is_weights=weights,
    )
    loss.backward()
    return loss.detach(), log_prob.grad, metrics


def _expected_objectives(name, batch, mode, hparams, info, with_tis):
    """compute_policy_loss with verl's normalisers, each written out from verl's agg_loss."""
    log_prob = batch["log_prob"].clone().requires_grad_(True)
    dp = (info or {}).get("dp_size", 1)
    num_tokens, num_seqs = (info or {}).get("batch_num_tokens"), (info or {}).get("global_batch_size")
    args = dict(rollout_log_prob=batch["rollout"], tis=True, tis_cap=TIS_CAP) if with_tis else {}
    args.update(hparams or {})
    call = lambda m, **kw: compute_policy_loss(name, log_prob, batch["old_log_prob"], batch["advantages"],  # noqa: E731
                                               batch["response_mask"], m, **args, **kw)[0]
    if mode == "token-mean":
        loss = call(mode, global_num_tokens=None if num_tokens is None else num_tokens / dp)
    elif mode == "token-sum":  # Σ L · dp = local token-mean × local tokens × dp
        loss = call("token-mean") * batch["response_mask"].sum() * dp
    elif mode == "seq-mean-token-sum-norm":  # verl: the seq-mean-token-sum value over the scale factor
        scale = (info or {}).get("loss_scale_factor") or batch["response_mask"].shape[1]
        loss = call("seq-mean-token-sum", global_num_seqs=None if num_seqs is None else num_seqs / dp) / scale
    else:
        loss = call(mode, global_num_seqs=None if num_seqs is None else num_seqs / dp)
    loss.backward()
    return loss.detach(), log_prob.grad


def _expected_hand(verl, name, batch, mode, hparams, info, weights):
    """The official VESPO formula written out, aggregated by verl's own agg_loss with global_batch_info."""
    hp = {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0, **(hparams or {})}
    log_prob = batch["log_prob"].clone().requires_grad_(True)
    mask = batch["response_mask"]
    log_w = (torch.clamp(log_prob.detach() - batch["old_log_prob"], -20, 20) * mask).sum(-1)
    if weights is not None:
        log_w = log_w + (torch.log(weights.clamp(min=1e-8)).clamp(-20, 20) * mask).sum(-1)
    lengths = mask.sum(-1)
    log_w = torch.clamp(log_w / {"vespo": 1.0, "vespo-lin": lengths, "vespo-sqrt": lengths.sqrt()}[name], -20, 20)
    w = torch.exp(log_w)
    positive = batch["advantages"][:, 0] >= 0
    k = torch.where(positive, hp["k_pos"], hp["k_neg"])
    lam = torch.where(positive, hp["lambda_pos"], hp["lambda_neg"]).clamp(min=1e-4)
    phi = torch.exp(lam + k * torch.log(w.clamp(min=1e-8)) - lam * w)
    loss_mat = -phi[:, None] * batch["advantages"] * log_prob
    loss = verl.core_algos.agg_loss(loss_mat, mask, mode, **(info or {}))
    loss.backward()
    return loss.detach(), log_prob.grad


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("setting", ["config-none", "explicit-local", "explicit-global", "default-global"])
@pytest.mark.parametrize("with_tis", [False, True], ids=["no-tis", "tis"])
def test_registered_loss_equals_objectives(verl, name, mode, setting, with_tis):
    batch = _batch()
    hparams = EXPLICIT if setting.startswith("explicit") else None
    info = GLOBAL_INFO if setting.endswith("global") else None
    if mode == "seq-mean-token-sum-norm" and setting == "default-global":
        info = {**GLOBAL_INFO, "loss_scale_factor": None}  # verl's default: the padded response length
    weights = _verl_weights(verl, batch) if with_tis else None
    config = _config(hparams, info) if setting != "default-global" else _config({}, info)
    loss, grad, metrics = _call_verl(verl, name, batch, mode, config, weights)
    ref_loss, ref_grad = _expected_objectives(name, batch, mode, hparams, info, with_tis)
    hand_loss, hand_grad = _expected_hand(verl, name, batch, mode, hparams, info, weights)
    assert grad.abs().max() > 1e-3
    for other_loss, other_grad in ((ref_loss, ref_grad), (hand_loss, hand_grad)):
        assert abs(float(loss) - float(other_loss)) <= 1e-12
        assert torch.allclose(grad, other_grad, rtol=0, atol=1e-12)
    expected = EXPLICIT if hparams else {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0}
    assert {k: metrics[f"vespo/{k}"] for k in expected} == expected
    assert metrics["vespo/tis_enabled"] == float(with_tis)
    assert metrics["actor/pg_clipfrac"] == 0.0 and metrics["actor/ppo_kl"] > 0
    assert all(isinstance(v, float) for v in metrics.values())


def test_config_through_verls_own_instantiation(verl):
    """An actor config built the way verl builds it (hydra _target_) carries the vespo block to the loss."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    actor = omega_conf_to_dataclass(OmegaConf.create({
        "_target_": "verl.workers.config.FSDPActorConfig", "strategy": "fsdp", "ppo_mini_batch_size": 4,
        "ppo_micro_batch_size_per_gpu": 1, "rollout_n": 1,
        "policy_loss": {"_target_": "vespo_megatron.integrations.verl.VespoPolicyLossConfig", "loss_mode": "vespo",
                        "vespo": {"k_pos": 2.5, "lambda_neg": 1.0}},
    }))
    assert type(actor.policy_loss) is verl.integration.VespoPolicyLossConfig
    batch = _batch(1)
    loss, grad, metrics = _call_verl(verl, "vespo", batch, "token-mean", actor, None)
    ref_loss, ref_grad = _expected_objectives("vespo", batch, "token-mean", {"k_pos": 2.5, "lambda_neg": 1.0}, None,
                                              False)
    assert abs(float(loss) - float(ref_loss)) <= 1e-12 and torch.allclose(grad, ref_grad, rtol=0, atol=1e-12)
    assert metrics["vespo/k_pos"] == 2.5 and metrics["vespo/lambda_pos"] == 3.0


@pytest.mark.parametrize("vespo_block, message", [
    ({"k_poss": 2.0}, r"policy_loss\.vespo\.k_poss: unknown VESPO hyper-parameter; known: k_pos"),
    ({"k_pos": -1.0}, r"policy_loss\.vespo\.k_pos: must be >= 0, got -1"),
    ({"lambda_neg": float("nan")}, r"policy_loss\.vespo\.lambda_neg: must be >= 0"),
])
def test_bad_hyper_parameters_name_the_key(verl, vespo_block, message):
    batch = _batch()
    with pytest.raises(ValueError, match=message):
        _call_verl(verl, "vespo", batch, "token-mean", _config(vespo_block, None), None)


def test_bad_aggregation_and_weights_name_the_field(verl):
    batch = _batch()
    with pytest.raises(ValueError, match=r"loss_agg_mode: unknown mode 'token-avg'"):
        _call_verl(verl, "vespo", batch, "token-avg", None, None)
    with pytest.raises(ValueError, match=r"global_batch_info\.batch_num_tokens: required for token-mean"):
        _call_verl(verl, "vespo", batch, "token-mean", _config(None, {"dp_size": 2}), None)
    icepop = _verl_weights(verl, batch).clone()
    icepop[2, 4] = 0.0  # an IcePop-rejected token: not a token-level TIS weight
    with pytest.raises(ValueError, match=r"rollout_is_weights: weight 0 at row 2, token 4 is not a token-level"):
        _call_verl(verl, "vespo", batch, "token-mean", None, icepop)
    with pytest.raises(ValueError, match=r"rollout_is_weights: shape \(6, 8\) differs"):
        _call_verl(verl, "vespo", batch, "token-mean", None, torch.ones(6, 8, dtype=torch.float64))


def _run_python(code: str, with_verl: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([str(VERL_DIR)] if with_verl else []))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)


def test_package_import_does_not_import_verl():
    result = _run_python(
        "import sys, vespo_megatron, vespo_megatron.objectives, vespo_megatron.integrations\n"
        "loaded = sorted(m for m in sys.modules if m == 'verl' or m.startswith('verl.'))\n"
        "assert not loaded, loaded\n", with_verl=True)
    assert result.returncode == 0, result.stderr


def test_clear_error_without_verl():
    result = _run_python("import sys; sys.modules['verl'] = None\nimport vespo_megatron.integrations.verl\n",
                         with_verl=False)
    assert result.returncode != 0
    assert "ImportError: vespo_megatron.integrations.verl needs verl (written against verl 0.9.1" in result.stderr


def test_verl_external_module_hook_registers_vespo():
    """VERL_USE_EXTERNAL_MODULES (read by ``import verl`` in every verl process) registers the three losses."""
    code = ("import sys, types\n"
            "ray = types.ModuleType('ray'); ray.ObjectRef = type('ObjectRef', (), {})\n"
            "sys.modules.setdefault('ray', ray)\n"
            "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as r\n"
            "print(sorted(n for n in r if n.startswith('vespo')))\n")
    env_code = "import os; os.environ['VERL_USE_EXTERNAL_MODULES'] = 'vespo_megatron.integrations.verl'\n" + code
    result = _run_python(env_code, with_verl=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['vespo', 'vespo-lin', 'vespo-sqrt']"
