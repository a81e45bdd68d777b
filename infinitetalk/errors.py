"""User-facing error types: each names what was wrong and what was expected."""
from __future__ import annotations

from .checkpoints.reader import CheckpointError

import os
from pathlib import Path

__all__ = ["InputError", "CheckpointError", "JobCancelled", "require_file"]


class InputError(ValueError):
    """A user input (file, parameter) that cannot be used; names the input and what was expected."""

    def __init__(self, input_name: str, message: str):
        self.input_name = input_name
        super().__init__(f"{input_name}: {message}")


class JobCancelled(RuntimeError):
    """Raised between steps when the caller's cancel hook says stop."""


def require_file(path: str | os.PathLike, name: str) -> Path:
    """`path` as a Path, or InputError(name) when it is missing or empty (checked before decoding)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(name, f"file not found: {p}")
    if p.stat().st_size == 0:
        raise InputError(name, f"the file is empty: {p}")
    return p
