"""User-facing error types: each names what was wrong and what was expected."""
from __future__ import annotations

from .checkpoints.reader import CheckpointError

__all__ = ["InputError", "CheckpointError", "JobCancelled"]


class InputError(ValueError):
    """A user input (file, parameter) that cannot be used; names the input and what was expected."""

    def __init__(self, input_name: str, message: str):
        self.input_name = input_name
        super().__init__(f"{input_name}: {message}")


class JobCancelled(RuntimeError):
    """Raised between steps when the caller's cancel hook says stop."""
