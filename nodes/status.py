"""The sampler's status line on its node (ComfyUI's progress text): what it is doing, and how it ended.

ComfyUI keeps the last text a node showed, so the line always ends on the outcome (result with the seed
used, the error, or how to resume after Cancel) instead of a stale "window 2/5".
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from infinitetalk.errors import JobCancelled
from infinitetalk.pipeline.progress import ProgressInfo, StageClock

from . import bridge

# the stage that just advanced -> what runs now
STAGE_WORDS = {"start": "preparing audio features and prompts", "prepare": "encoding the reference",
               "encode": "sampling", "steps": "sampling", "decode": "decoding frames", "write": "writing the mp4"}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class JobStatus:
    """Progress hook (done, total, info) of one sampler job that keeps the node's text current."""

    def __init__(self, send: Callable[[str], None] | None = None):
        self.send = send or (lambda text: bridge.progress_text(text))
        self.clock = StageClock()
        self.info: ProgressInfo | None = None

    def say(self, text: str) -> None:
        self.send(text)

    def __call__(self, done: int, total: int, info: ProgressInfo) -> None:
        self.clock.tick(done, info)
        self.info = info
        self.send(self.text(info))

    def text(self, info: ProgressInfo) -> str:
        """e.g. 'window 2/5 · step 3/6 · sampling · about 4 min 10 s left'."""
        window = min(info.window + 1, info.windows)
        parts = [f"window {window}/{info.windows}"]
        sampling = info.stage == "encode" or (info.stage == "steps" and info.step < info.steps)
        if info.stage in ("encode", "steps"):
            parts.append(f"step {info.step}/{info.steps}")
        parts.append(STAGE_WORDS["steps"] if sampling else STAGE_WORDS["decode"] if info.stage == "steps"
                     else STAGE_WORDS.get(info.stage, info.stage))
        eta = self.clock.eta(info)
        if eta is None:
            parts.append("time left: measuring")
        else:
            parts.append(f"{'more than ' if eta[1] else 'about '}{_duration(eta[0])} left")
        if info.resumed_windows:
            parts.append(f"resumed after window {info.resumed_windows}")
        return " · ".join(parts)

    @contextmanager
    def outcome(self, seed: int) -> Iterator[None]:
        """Around model loading and the job: a cancel or an error ends the text on what happened."""
        try:
            yield
        except JobCancelled:
            self.cancelled(seed)
            raise
        except Exception as err:
            self.failed(err)
            raise

    def windows_done(self) -> int:
        """Windows finished and kept in the job folder so far."""
        return self.info.window if self.info is not None else 0

    def cancelled(self, seed: int) -> None:
        done, total = self.windows_done(), self.info.windows if self.info else 0
        if done:
            self.send(f"Cancelled after window {done}/{total}. Run again with seed {seed} (set its control to "
                      f"'fixed') to resume from window {done + 1}.")
        else:
            self.send("Cancelled before the first window finished; nothing was kept.")

    def failed(self, error: BaseException) -> None:
        kept = self.windows_done()
        where = f" (windows 1-{kept} are kept: fix it and run again to resume)" if kept else ""
        self.send(f"Stopped by an error{where}: {error}")

    def finished(self, frames: int, fps: float, seed: int, seconds: float) -> None:
        self.send(f"Done: {frames} frames ({frames / fps:.1f} s of video), seed {seed}, in {_duration(seconds)}")
