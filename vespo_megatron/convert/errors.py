"""The one error type of the converter: a ValueError that names the file and the tensor it is about."""
from __future__ import annotations

from pathlib import Path


class ConversionError(ValueError):
    """``ConversionError(message, file=..., tensor=...)`` renders as ``file: tensor: message``.

    Every check of the converter raises it before anything is written, so a failed run leaves no output behind.
    """

    def __init__(self, message: str, *, file: str | Path | None = None, tensor: str | None = None) -> None:
        self.file = None if file is None else str(file)
        self.tensor = tensor
        self.reason = message
        where = [part for part in (self.file, f"tensor {tensor!r}" if tensor else None) if part]
        super().__init__(": ".join([*where, message]))
