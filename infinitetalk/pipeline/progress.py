"""Progress of one job over every stage of every window, not only the model steps.

Work is counted in units: per job 1 `prepare` up front (audio features, prompt embeddings); per window 1
`encode` (reference/motion latents, CLIP, audio window), one unit per sampling `steps`, one per decoded latent
frame (`decode`: VAE decode, colour match and the segment write); per job 1 `write` at the end (joining the
segments with the audio). Units are not seconds: stages differ in cost by device (on a CPU the VAE decode can take as
long as the steps), so an honest ETA measures each stage's time per unit (see the CLI's ProgressBar) using the
units left per stage that every event carries.

A hook is called `hook(done, total)` or, when it accepts a third argument, `hook(done, total, info)`.
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["STAGES", "ProgressInfo", "ProgressHook", "JobProgress", "StageClock"]

STAGES = ("prepare", "encode", "steps", "decode", "write")
ProgressHook = Callable[..., None]   # (done, total) or (done, total, ProgressInfo)


@dataclass(frozen=True)
class ProgressInfo:
    """What one progress event is about."""

    stage: str                 # the stage that just advanced ("start" for the first event)
    window: int                # 0-based window being worked on (== windows once all are done)
    windows: int
    remaining: dict            # units left per stage
    resumed_windows: int = 0   # windows that were already finished in the job folder
    steps: int = 0             # sampling steps per window

    @property
    def step(self) -> int:
        """Sampling steps done in the window being worked on (0 .. steps)."""
        later = max(0, self.windows - self.window - 1) * self.steps
        return max(0, min(self.steps, self.steps - (self.remaining.get("steps", 0) - later)))


def _wants_info(hook: ProgressHook) -> bool:
    try:
        inspect.signature(hook).bind(0, 0, None)
    except (TypeError, ValueError):   # takes two arguments, or has no signature (some builtins): the plain form
        return False
    return True


class JobProgress:
    """Counts a job's units and reports them to the caller's hook (no-op without one)."""

    def __init__(self, hook: ProgressHook | None, windows: int, steps: int, decode_units: int, resumed: int = 0):
        self.hook, self.with_info = hook, hook is not None and _wants_info(hook)
        self.windows, self.resumed, self.window = windows, resumed, resumed
        self.per_window = {"encode": 1, "steps": steps, "decode": decode_units}
        self.total = 2 + windows * sum(self.per_window.values())
        self.done = resumed * sum(self.per_window.values())
        left = windows - resumed
        # prepare: the job's audio features and prompt embeddings; write: joining the segments with the audio
        self.remaining = {"prepare": 1, **{stage: left * n for stage, n in self.per_window.items()}, "write": 1}

    def start(self) -> None:
        self._emit("start")

    def advance(self, stage: str, units: int = 1) -> None:
        """`units` of `stage` are done (clamped to what is left of it)."""
        units = max(0, min(int(units), self.remaining[stage]))
        if units:
            self.remaining[stage] -= units
            self.done += units
            self._emit(stage)

    def window_done(self, index: int) -> None:
        """Window `index` is committed: any of its units a stage did not report count as done now."""
        self.window = index + 1
        left = self.windows - self.window
        extra = 0
        for stage, per in self.per_window.items():
            surplus = self.remaining[stage] - left * per
            if surplus > 0:
                self.remaining[stage] -= surplus
                extra += surplus
        self.done += extra
        if extra:
            self._emit("decode")

    def finish(self) -> None:
        """The final file is in place: everything is done."""
        for stage in self.remaining:
            self.remaining[stage] = 0
        self.window, self.done = self.windows, self.total
        self._emit("write")

    def _emit(self, stage: str) -> None:
        if self.hook is None:
            return
        if self.with_info:
            info = ProgressInfo(stage, min(self.window, self.windows), self.windows, dict(self.remaining),
                                self.resumed, self.per_window["steps"])
            self.hook(self.done, self.total, info)
        else:
            self.hook(self.done, self.total)


class StageClock:
    """An honest ETA: each stage's time per unit is measured as it runs and multiplied by the units left of it.

    Feed it every event (`tick`); `eta` is None before anything with work left was timed, else (seconds,
    lower_bound) where lower_bound says some stage with work left (say, the first VAE decode) is not timed yet.
    The final `write` (a remux) is not counted: seconds at most."""

    def __init__(self):
        self.spent: dict[str, tuple[float, int]] = {}   # stage -> (seconds, units) measured
        self.last_done: int | None = None
        self.last_t = time.perf_counter()

    def tick(self, done: int, info: ProgressInfo) -> None:
        now = time.perf_counter()
        if self.last_done is not None and done > self.last_done:
            seconds, units = self.spent.get(info.stage, (0.0, 0))
            self.spent[info.stage] = (seconds + now - self.last_t, units + done - self.last_done)
        self.last_done, self.last_t = done, now

    def eta(self, info: ProgressInfo) -> tuple[float, bool] | None:
        seconds, unknown = 0.0, False
        for stage, left in info.remaining.items():
            if left <= 0 or stage == "write":
                continue
            spent, units = self.spent.get(stage, (0.0, 0))
            if units == 0:
                unknown = True
            else:
                seconds += spent / units * left
        return None if unknown and seconds == 0.0 else (seconds, unknown)
