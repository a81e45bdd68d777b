"""File facts and writes shared by the pipeline, the media writers and the job API; stdlib only.

`file_sha256`: job fingerprints and staged inputs. `atomic_write`: every file we produce is written under a
hidden partial name beside its final name and renamed onto it only when complete, so a reader (ComfyUI, a
resumed job, a client) never sees half a file and a failure leaves the final name as it was.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_sha256", "partial_path", "atomic_write"]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB blocks (inputs can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def partial_path(out: str | os.PathLike) -> Path:
    """Where a file is written before its rename (same folder, hidden name, same suffix)."""
    out = Path(out)
    return out.with_name(f".{out.stem}.partial{out.suffix}")


class atomic_write:   # noqa: N801 - used like contextlib's lowercase context managers
    """Write `path` through `partial` (default `partial_path(path)`), then rename it onto `path`.

        with atomic_write(out) as part:   # renamed onto `out` on a normal exit, removed on any error
            write_to(part)

    Writers that outlive one block (the streaming mp4 writer) call `commit()` / `discard()` themselves.
    The rename is atomic within one filesystem (the partial file sits in the same folder)."""

    def __init__(self, path: str | os.PathLike, partial: str | os.PathLike | None = None):
        self.path = Path(path)
        self.partial = Path(partial) if partial is not None else partial_path(self.path)

    def commit(self) -> Path:
        """Move the finished partial file onto `path`; the partial name is free afterwards, even on failure."""
        try:
            os.replace(self.partial, self.path)
        finally:
            self.discard()
        return self.path

    def discard(self) -> None:
        """Remove the partial file (if any); `path` is untouched."""
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
