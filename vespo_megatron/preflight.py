"""Checks of user input that every command runs before any rank, engine or model starts.

Each raises :class:`~vespo_megatron.errors.UsageError` naming the flag; none imports torch, so a mistyped flag is
reported in well under a second.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from vespo_megatron.errors import UsageError


def hf_dir(path: str | Path, flag: str) -> Path:
    """``path`` must be an HF directory: a ``config.json`` with a ``model_type``."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(flag, f"{path}: no such directory")
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(flag, f"{path}: no config.json (expected a save_pretrained directory)")
    try:
        json.loads(config.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UsageError(flag, f"{config}: not a valid HF config ({err!r})") from err
    return path


def mcore_checkpoint(path: str | Path, flag: str) -> Path:
    """``path`` must be a Megatron distributed checkpoint directory (its ``metadata.json``)."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(flag, f"{path}: no such directory")
    if not (path / "metadata.json").is_file():
        raise UsageError(flag, f"{path}: not a Megatron distributed checkpoint (metadata.json missing)")
    return path


def model_checkpoint_or_save(path: str | Path, flag: str) -> Path:
    """The Megatron checkpoint of ``path``: ``path`` itself, or the model of the latest iteration of a training save
    (``latest`` -> ``iter_*/model``)."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(flag, f"{path}: no such directory")
    marker = path / "latest"
    if not (path / "metadata.json").is_file() and marker.is_file():
        return mcore_checkpoint(path / marker.read_text().strip() / "model", flag)
    if not (path / "metadata.json").is_file():
        raise UsageError(flag, f"{path}: neither a Megatron distributed checkpoint (metadata.json) nor a training "
                         "save (latest -> iter_*/model)")
    return path


def existing_file(path: str | Path, flag: str) -> Path:
    if not Path(path).is_file():
        raise UsageError(flag, f"{path}: no such file")
    return Path(path)


def at_least(value: float, minimum: float, flag: str) -> None:
    if value < minimum:
        raise UsageError(flag, f"must be >= {minimum}, got {value}")


def positive(value: float, flag: str) -> None:
    if not value > 0:
        raise UsageError(flag, f"must be > 0, got {value}")


def reachable(url: str, flag: str = "--sglang-url", timeout_s: float = 3.0) -> None:
    """``GET url/health`` must answer 200 within ``timeout_s``."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise UsageError(flag, f"{url}: the rollout engine is unreachable ({reason})") from err
    if status != 200:
        raise UsageError(flag, f"{url}: /health answered {status}, the rollout engine is not healthy")
