"""HF checkpoint tensor names -> the CPU engine's in-memory parameters, and per-tensor digests for weight checks.

transformers 5 keeps MoE experts FUSED in memory (``mlp.experts.gate_up_proj`` [E, 2F, H] with gate = [:, :F] and
up = [:, F:], ``mlp.experts.down_proj`` [E, H, F]) but saves and loads them PER EXPERT
(``mlp.experts.{e}.{gate,up,down}_proj.weight`` [F, H] / [F, H] / [H, F]); Mixtral checkpoints use the legacy names
``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`` and ``block_sparse_moe.gate.weight``. A weight update may use
either naming; digests are keyed by the canonical (Qwen3-style, per-expert) name so both sides can compare.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import torch

_EXPERT = re.compile(
    r"^(?P<layer>model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
    r"(?P<part>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_MIXTRAL_ROUTER = re.compile(r"^(?P<layer>model\.layers\.\d+)\.block_sparse_moe\.gate\.weight$")
_LEGACY_PART = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_FUSED = re.compile(r"^(?P<layer>model\.layers\.\d+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")


def canonical_name(name: str) -> str:
    """Map a checkpoint name to its canonical form (Mixtral legacy names -> ``mlp.experts.{e}.*_proj``)."""
    expert = _EXPERT.match(name)
    if expert:
        part = _LEGACY_PART.get(expert["part"], expert["part"])
        return f"{expert['layer']}.mlp.experts.{expert['expert']}.{part}.weight"
    router = _MIXTRAL_ROUTER.match(name)
    return f"{router['layer']}.mlp.gate.weight" if router else name


def engine_view(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The engine tensor (a view, writable in place) that checkpoint tensor ``name`` maps to.

    ``state`` is ``model.state_dict(keep_vars=True)``. Raises ValueError naming the tensor when nothing matches.
    """
    canon = canonical_name(name)
    expert = _EXPERT.match(canon)
    if expert is None:
        if canon not in state:
            raise ValueError(f"weight {name!r} matches no parameter of the engine")
        return state[canon]
    layer, index, part = expert["layer"], int(expert["expert"]), expert["part"]
    fused_name = f"{layer}.mlp.experts.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}"
    if fused_name not in state:
        raise ValueError(f"weight {name!r}: the engine has no fused expert tensor {fused_name!r}")
    fused = state[fused_name]
    if index >= fused.shape[0]:
        raise ValueError(f"weight {name!r}: expert {index} out of range (the engine has {fused.shape[0]})")
    if part == "down_proj":
        return fused[index]
    half = fused.shape[1] // 2
    return fused[index, :half] if part == "gate_proj" else fused[index, half:]


def checkpoint_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Canonical per-expert names covering every tensor of ``state`` (fused experts expanded, one name per expert)."""
    names: list[str] = []
    for name, tensor in state.items():
        fused = _FUSED.match(name)
        if fused is None:
            names.append(name)
            continue
        parts = ("down_proj",) if fused["kind"] == "down_proj" else ("gate_proj", "up_proj")
        names += [f"{fused['layer']}.mlp.experts.{e}.{p}.weight" for e in range(tensor.shape[0]) for p in parts]
    return names


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a tensor's dtype, shape and bytes: equal iff bitwise equal."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def mismatched_weights(named_tensors: Iterable[tuple[str, torch.Tensor]],
                       engine_digests: dict[str, dict[str, str]]) -> list[str]:
    """Names of sent tensors the engine does not hold bitwise (after casting to the engine tensor's dtype).

    ``engine_digests``: canonical name -> {"dtype": "bfloat16", "digest": ...}, as the engine's
    ``weights_checksum()`` of the in-process CPU engine reports them; a name it lacks counts as mismatched.
    """
    bad: list[str] = []
    for name, tensor in named_tensors:
        held = engine_digests.get(canonical_name(name))
        if held is None or tensor_digest(tensor.to(getattr(torch, held["dtype"]))) != held["digest"]:
            bad.append(name)
    return bad
