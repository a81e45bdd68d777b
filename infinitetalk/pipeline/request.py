"""One generation job, named like the hosted APIs (WaveSpeed / RunComfy infinitetalk multi).

The CLI, the ComfyUI sampler node and the hosted job API all build a `GenerationRequest`; presets
and defaults are data here so every entry point behaves the same.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import InputError

ORDERS = ("meanwhile", "left_right", "right_left")
RESOLUTIONS = ("480p", "720p")
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class Preset:
    """Sampling recipe. `text_scale == 1` means 2 model calls per step (cond + drop-audio)."""

    steps: int
    text_scale: float
    audio_scale: float
    shift: float | None  # None: by resolution (7 at 480p, 11 at 720p), as the reference
    needs_distill_lora: bool


PRESETS: dict[str, Preset] = {
    # The reference defaults: 40 steps, 3 model calls per step (text 5, audio 4).
    "quality": Preset(steps=40, text_scale=5.0, audio_scale=4.0, shift=None, needs_distill_lora=False),
    # Distill-LoRA recipe (lightx2v / FusionX): few steps, 2 model calls per step.
    "fast": Preset(steps=6, text_scale=1.0, audio_scale=2.0, shift=None, needs_distill_lora=True),
}


@dataclass
class GenerationRequest:
    """Everything one job needs. Paths are local files; URL/data-URI fetching happens before this."""

    left_audio: Path
    right_audio: Path
    out: Path
    image: Path | None = None
    video: Path | None = None
    mask_image: Path | None = None  # white = may move (both speakers); outside it stays as the source
    prompt: str = "Two people are talking to each other."
    negative_prompt: str | None = None  # None: the reference's default negative prompt
    order: str | None = None  # None: "meanwhile" for video input, "left_right" for image input
    resolution: str = "480p"
    seed: int = -1
    preset: str = "quality"
    steps: int | None = None  # None: the preset's
    text_scale: float | None = None
    audio_scale: float | None = None
    shift: float | None = None
    color_strength: float = 1.0
    frame_num: int = 81
    motion_frames: int = 9
    crf: int = 19
    job_dir: Path | None = None  # resumable state; None: a folder beside `out`
    size_scale: float = 1.0  # shrinks the resolution buckets (tests, previews); 1.0 for real use
    extra: dict = field(default_factory=dict)
    # Per-speaker region images (white = that speaker); default: the reference's left/right halves, or the
    # halves of `mask_image` when one is given.
    left_mask: Path | None = None
    right_mask: Path | None = None
    keep_job: bool = False  # keep the job folder after success (otherwise removed once the mp4 is in place)

    # -- resolved values -------------------------------------------------------------------------
    def resolved(self) -> "GenerationRequest":
        """Validated copy with every default filled in (seed drawn when −1)."""
        self.validate()
        preset = PRESETS[self.preset]
        seed = self.seed if self.seed >= 0 else random.SystemRandom().randint(0, MAX_SEED)
        return replace(
            self,
            order=self.order or ("meanwhile" if self.video is not None else "left_right"),
            steps=self.steps or preset.steps,
            text_scale=preset.text_scale if self.text_scale is None else self.text_scale,
            audio_scale=preset.audio_scale if self.audio_scale is None else self.audio_scale,
            shift=self.shift if self.shift is not None else preset.shift,
            seed=seed,
        )

    def validate(self) -> None:
        if (self.image is None) == (self.video is None):
            raise InputError("image/video", "give exactly one of an image or a video showing the two people")
        if self.order is not None and self.order not in ORDERS:
            raise InputError("order", f"{self.order!r} is not one of {', '.join(ORDERS)}")
        if self.resolution not in RESOLUTIONS:
            raise InputError("resolution", f"{self.resolution!r} is not one of {', '.join(RESOLUTIONS)}")
        if not (-1 <= int(self.seed) <= MAX_SEED):
            raise InputError("seed", f"{self.seed} is outside -1 .. {MAX_SEED} (-1 = random)")
        if self.preset not in PRESETS:
            raise InputError("preset", f"{self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.steps is not None and not (1 <= self.steps <= 100):
            raise InputError("steps", f"{self.steps} is outside 1 .. 100")
        if not (0.0 <= self.color_strength <= 1.0):
            raise InputError("color_strength", f"{self.color_strength} is outside 0 .. 1")
        if (self.frame_num - 1) % 4 or (self.motion_frames - 1) % 4 or self.motion_frames >= self.frame_num:
            raise InputError("frame_num/motion_frames", "both must be 4n+1 and motion_frames < frame_num (81 / 9)")
        if not (0.0 < self.size_scale <= 1.0):
            raise InputError("size_scale", f"{self.size_scale} is outside (0, 1]")
        if (self.left_mask is None) != (self.right_mask is None):
            raise InputError("left_mask/right_mask", "give both speaker masks or neither")
        if not (0 <= int(self.crf) <= 51):
            raise InputError("crf", f"{self.crf} is outside 0 .. 51")
        if self.shift is not None and not self.shift > 0:
            raise InputError("shift", f"{self.shift} must be positive")
        if Path(self.out).suffix.lower() != ".mp4":
            raise InputError("out", f"{self.out} must end in .mp4")
