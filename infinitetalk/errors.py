"""User-facing error types: each names what was wrong and what was expected."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["InputError", "CheckpointError", "JobCancelled", "WorkerLost", "OutOfSpace", "is_out_of_space",
           "disk_full_as_out_of_space", "require_file", "require_writable_folder",
           "unreadable_reason"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message always names the file."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class InputError(ValueError):
    """A user input (file, parameter) that cannot be used; names the input and what was expected."""

    def __init__(self, input_name: str, message: str):
        self.input_name = input_name
        super().__init__(f"{input_name}: {message}")


class OutOfSpace(InputError):
    """The disk holding `folder` is full (or over quota): names the folder; the partial file is already removed
    and a job folder keeps its finished windows, so rerunning the same command after freeing space resumes."""

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder = Path(folder)
        super().__init__("disk", f"no space left on the device holding {self.folder} while writing {what}; "
                                     f"free some space there and run the same job again (finished windows are kept)")


def is_out_of_space(exc: BaseException) -> bool:
    """Whether an exception (OSError, PyAV's OSError subclasses) means the disk is full or over quota."""
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def disk_full_as_out_of_space(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Around writing `what` in `folder` (through `files.atomic_write`, which removes the partial file):
    a full disk becomes OutOfSpace(folder, what)."""
    try:
        yield
    except OSError as exc:
        if is_out_of_space(exc):
            raise OutOfSpace(folder, what) from None
        raise


class JobCancelled(RuntimeError):
    """Raised between steps when the caller's cancel hook says stop."""


class WorkerLost(RuntimeError):
    """Another process of a multi-process job died or stopped answering; the job folder keeps finished windows."""


def unreadable_reason(exc: BaseException, kind: str) -> str:
    """Why a media file could not be opened, in words (no errno numbers): `kind` is what it should have been."""
    if isinstance(exc, PermissionError):
        return "permission denied (the file cannot be read by this user)"
    if type(exc).__name__ == "InvalidDataError":   # PyAV: FFmpeg found no format it knows in the bytes
        return f"it is not {kind} (damaged, or another kind of file)"
    text = getattr(exc, "strerror", None) or str(exc)
    return f"it is not {kind} that can be decoded ({text[:1].lower() + text[1:]})"


def require_file(path: str | os.PathLike, name: str) -> Path:
    """`path` as a Path, or InputError(name) when it is missing or empty (checked before decoding)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(name, f"{p} is a folder; expected a file")
    if not p.is_file():
        raise InputError(name, f"file not found: {p}")
    if p.stat().st_size == 0:
        raise InputError(name, f"the file is empty: {p}")
    return p


def require_writable_folder(folder: str | os.PathLike, name: str) -> Path:
    """`folder`, created if missing, or InputError(name) when it cannot be created or written (checked before
    any model work, so an unwritable output does not fail after minutes of loading and sampling)."""
    p = Path(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(name, f"cannot create the folder {p} ({exc.strerror or exc})") from None
    if not p.is_dir():
        raise InputError(name, f"{p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise InputError(name, f"the folder {p} is not writable")
    return p
