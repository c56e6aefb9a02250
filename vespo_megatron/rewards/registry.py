"""One registry of reward functions with one signature, and the loader of users' functions (``module:function``).

Signature: ``fn(sample: RewardSample) -> float | {"score": float, **extras}``. A function registered with
``batched=True`` takes ``list[RewardSample]`` and returns a list of such values; an ``async def`` function is awaited
(all samples of a batch concurrently). Numeric extras are logged as ``reward/<key>`` means.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class RewardSample:
    """What a reward sees of one sample: ``rid`` names it (the request id), ``prompt``/``response`` are the
    detokenised texts ("" without a tokenizer), ``prompt_ids`` [P] / ``response_ids`` [N] the tokens (the stop token
    included when generated), ``label`` and ``metadata`` come from the dataset row."""

    rid: str
    prompt: str
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reward:
    """A reward function and how to call it."""

    name: str
    fn: Callable[..., Any]
    batched: bool = False

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)


REWARDS: dict[str, Reward] = {}


def register_reward(name: str, batched: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: ``@register_reward("math")`` adds ``fn`` under ``name`` (a name is registered once)."""

    def add(fn: Callable) -> Callable:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered ({REWARDS[name].fn.__module__})")
        REWARDS[name] = Reward(name, fn, batched)
        return fn

    return add


def _import_target(module: str) -> Any:
    """A module by dotted name, or a ``.py`` file by path."""
    if module.endswith(".py") or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise ValueError(f"--custom-reward-path: no file {path}")
        spec = importlib.util.spec_from_file_location(f"vespo_custom_reward_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as err:  # noqa: BLE001 - the user's module: name it and its error
            raise ValueError(f"--custom-reward-path: importing {path} failed: {type(err).__name__}: {err}") from err
        return mod
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ValueError(f"--custom-reward-path: cannot import module {module!r} ({err})") from None
    except Exception as err:  # noqa: BLE001 - the user's module: name it and its error
        raise ValueError(f"--custom-reward-path: importing {module} failed: {type(err).__name__}: {err}") from err


def load_custom_reward(path: str, batched: bool = False) -> Reward:
    """The user's reward ``module:function`` (a dotted module or a ``file.py``), checked to be callable."""
    module, sep, attr = path.rpartition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--custom-reward-path: expected module:function or file.py:function, got {path!r}")
    target = _import_target(module)
    fn = getattr(target, attr, None)
    if fn is None:
        raise ValueError(f"--custom-reward-path: {module!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"--custom-reward-path: {path} is a {type(fn).__name__}, not callable")
    return Reward(path, fn, batched)


def get_reward(name: str, custom_path: Optional[str] = None, batched: bool = False) -> Reward:
    """``--reward NAME`` from the registry, or the function of ``--custom-reward-path`` (which wins)."""
    if custom_path:
        return load_custom_reward(custom_path, batched)
    if name not in REWARDS:
        raise ValueError(f"--reward: unknown reward {name!r}; known: {', '.join(sorted(REWARDS))} "
                         "(or --custom-reward-path module:function)")
    return REWARDS[name]
