"""The job folder: what a crashed or cancelled job needs to continue where it stopped.

Per finished window the folder holds its encoded segment (`segment_0000.mp4`, ...) and, for the latest one,
the colour-corrected last motion frames (`tail_0000.pt`, float, exactly what the next window encodes);
`state.json`, written last (atomically), is the commit point: it names the request fingerprint, the seed and
how many windows are done. Rerunning the same request with the same folder continues after the last
finished window; a different request starts the folder afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import disk_full_as_out_of_space
from ..files import atomic_write, file_sha256

if TYPE_CHECKING:
    from .request import GenerationRequest

__all__ = ["JobState", "JobFolder", "fingerprint", "default_job_dir"]

STATE_VERSION = 1


def default_job_dir(out: Path) -> Path:
    """The job folder used when the request names none: hidden, beside the output file."""
    out = Path(out)
    return out.with_name(f".{out.stem}.job")


def fingerprint(request: GenerationRequest, models_id: str = "") -> str:
    """Identity of a job: every parameter that changes the frames, the input files' content and the models.

    The output path and the job folder are left out (moving the output does not invalidate the work); an
    unresolved seed (−1) is part of it, the drawn seed is kept in the state.
    """
    params = {}
    for name, value in sorted(vars(request).items()):
        if name in ("out", "job_dir", "keep_job"):
            continue
        if isinstance(value, Path) or (name in ("left_audio", "right_audio", "image", "video", "mask_image",
                                                "left_mask", "right_mask", "stereo_audio")
                                       and value is not None):
            value = {"file": file_sha256(Path(value))}
        params[name] = value
    blob = json.dumps({"params": params, "models": models_id}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class JobState:
    fingerprint: str
    seed: int
    windows_total: int
    windows_done: int = 0
    frames_done: int = 0
    version: int = STATE_VERSION
    info: dict = field(default_factory=dict)


class JobFolder:
    """Reads and commits per-window progress in one folder."""

    STATE = "state.json"

    def __init__(self, path: Path):
        self.path = Path(path)

    # -- reading ---------------------------------------------------------------------------------
    def load(self, fingerprint_: str) -> JobState | None:
        """The committed state if it belongs to this job and its files are all there, else None."""
        try:
            data = json.loads((self.path / self.STATE).read_text())
            state = JobState(**data)
        except (OSError, ValueError, TypeError):
            return None
        if state.version != STATE_VERSION or state.fingerprint != fingerprint_:
            return None
        if any(not p.is_file() for p in self.segments(state.windows_done)):
            return None
        if state.windows_done and not self.tail(state.windows_done - 1).is_file():
            return None
        return state

    def segment(self, index: int) -> Path:
        return self.path / f"segment_{index:04d}.mp4"

    def segments(self, count: int) -> list[Path]:
        return [self.segment(i) for i in range(count)]

    def tail(self, index: int) -> Path:
        return self.path / f"tail_{index:04d}.pt"

    def load_tail(self, index: int) -> torch.Tensor:
        return torch.load(self.tail(index), map_location="cpu", weights_only=True)

    # -- writing ---------------------------------------------------------------------------------
    def start(self, state: JobState) -> None:
        """Begin a fresh job: drop whatever an older job left here (only our own files), write the state."""
        self.path.mkdir(parents=True, exist_ok=True)
        for pattern in ("segment_*.mp4", ".segment_*.partial.mp4", "tail_*.pt", "*.tmp", self.STATE):
            for p in self.path.glob(pattern):
                p.unlink()
        self.commit(state)

    def save_tail(self, index: int, frames: torch.Tensor) -> None:
        tmp = self.path / f"tail_{index:04d}.tmp"
        data = frames.detach().to("cpu", torch.float32).contiguous()
        # through a Python file object: a full disk is then an OSError (ENOSPC), not torch's opaque RuntimeError
        self._write_atomic(tmp, self.tail(index), lambda f: torch.save(data, f))

    def commit(self, state: JobState) -> None:
        """Atomically record progress (the only point where a window counts as done); older tails go."""
        blob = json.dumps(asdict(state), indent=1).encode()
        self._write_atomic(self.path / (self.STATE + ".tmp"), self.path / self.STATE, lambda f: f.write(blob))
        if state.windows_done >= 2:
            self.tail(state.windows_done - 2).unlink(missing_ok=True)

    def _write_atomic(self, tmp: Path, final: Path, write) -> None:
        """Write through `tmp` then rename onto `final`. On any failure the temp file is removed and the
        committed state is untouched (the folder stays resumable); a full disk is an OutOfSpace naming it."""
        with disk_full_as_out_of_space(self.path, final.name), atomic_write(final, partial=tmp) as part:
            with open(part, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())

    def remove(self) -> None:
        """Delete the folder after the final file is in place."""
        shutil.rmtree(self.path, ignore_errors=True)
