"""Reading a prompt file into a ``datasets.Dataset``: jsonl / json, parquet, or a ``save_to_disk`` directory.

Nothing is fetched from a hub: the packaged json / parquet builders read local files only. A jsonl file is first
checked line by line (UTF-8, one JSON object per line) so that an undecodable line is an error naming the file and
the row; with ``bad_rows="skip"`` such lines are dropped and counted instead.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class PromptDataError(ValueError):
    """A prompt file or one of its rows is unusable; the message names the file (and the row)."""


def _scan_jsonl(path: Path, skip: bool) -> tuple[list[dict[str, Any]], int]:
    """Rows of a jsonl file read line by line; a bad line raises naming its row (0-based, blank lines not counted),
    or is counted when ``skip``. Returns (rows, number of undecodable rows)."""
    rows: list[dict[str, Any]] = []
    bad = 0
    with open(path, "rb") as handle:
        row = 0
        for raw in handle:
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
                if not isinstance(value, dict):
                    raise ValueError(f"a JSON {type(value).__name__}, not an object")
            except (UnicodeDecodeError, ValueError) as err:
                if not skip:
                    raise PromptDataError(f"{path}: row {row}: undecodable ({err})") from None
                bad += 1
            else:
                rows.append(value)
            row += 1
    return rows, bad


def load_rows(path: str | Path, split: str = "train", skip_undecodable: bool = False) -> tuple[Any, int]:
    """Open ``path`` with the ``datasets`` library.

    Args:
        path: a ``.jsonl`` / ``.json`` / ``.parquet`` file, or a directory written by ``save_to_disk`` (a Dataset, or
            a DatasetDict from which ``split`` is taken).
        split: the split of a saved DatasetDict.
        skip_undecodable: drop (and count) jsonl lines that are not JSON objects instead of raising.

    Returns:
        (dataset, number of undecodable rows dropped).
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise PromptDataError(f"{path}: no such file or directory")
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise PromptDataError(f"{path}: not a directory written by datasets' save_to_disk ({err})") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise PromptDataError(f"{path}: no split {split!r} (has {', '.join(data)})")
            data = data[split]
        return data, 0
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise PromptDataError(f"{path}: unknown format {path.suffix!r} (jsonl, json, parquet or a save_to_disk dir)")
    datasets.disable_progress_bars()
    if builder == "json" and path.suffix.lower() == ".jsonl":
        rows, bad = _scan_jsonl(path, skip_undecodable)  # names the row of a line the builder would choke on
        if bad:
            logger.warning("%s: %d undecodable rows dropped", path, bad)
            return datasets.Dataset.from_list(rows), bad
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train"), 0
    except Exception as err:  # noqa: BLE001 - the builders raise many types; the file is named here
        raise PromptDataError(f"{path}: unreadable {builder} file ({err})") from None
