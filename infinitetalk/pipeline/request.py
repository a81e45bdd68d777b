"""One generation job, named like the hosted APIs (WaveSpeed / RunComfy infinitetalk multi).

The CLI, the ComfyUI sampler node and the hosted job API all build a `GenerationRequest`; presets
and defaults are data here so every entry point behaves the same.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import InputError
from ..text.prompts import DEFAULT_PROMPT, join_prompts
from .schedule import shift_for

ORDERS = ("meanwhile", "left_right", "right_left")
RESOLUTIONS = ("480p", "720p")
MAX_SEED = 2**31 - 1
MAX_GUIDANCE = 20.0


@dataclass(frozen=True)
class Preset:
    """Sampling recipe. `text_guidance == 1` means 2 model calls per step (cond + drop-audio); both guidances
    1 means one call per step (no guidance pass at all: the guided velocity is the conditional one).

    The two guidance scales are named for what they are (classifier-free guidance strengths), not
    `*_scale`: elsewhere `audio_scale` means the audio signal's strength (1.0), a different knob."""

    steps: int
    text_guidance: float
    audio_guidance: float
    shift: float | Mapping[str, float] | None  # None: by resolution (7 at 480p, 11 at 720p), as the reference
    needs_distill_lora: bool   # step distillation needed: a distill LoRA (or, with `distilled_dit`, that DiT)
    distilled_dit: bool = False   # made for a step-distilled DiT file; without one the distill LoRA stands in

    def shift_at(self, resolution: str) -> float:
        """The timestep shift of this preset at a resolution ('480p' / '720p')."""
        if self.shift is None:
            return shift_for(resolution)
        if isinstance(self.shift, Mapping):
            if resolution not in self.shift:
                raise InputError("resolution", f"expected one of {', '.join(self.shift)}, got {resolution!r}")
            return float(self.shift[resolution])
        return float(self.shift)


PRESETS: dict[str, Preset] = {
    # The reference defaults: 40 steps, 3 model calls per step (text 5, audio 4).
    "quality": Preset(steps=40, text_guidance=5.0, audio_guidance=4.0, shift=None, needs_distill_lora=False),
    # Distill-LoRA recipe (lightx2v / FusionX): few steps, 2 model calls per step.
    "fast": Preset(steps=6, text_guidance=1.0, audio_guidance=2.0, shift=None, needs_distill_lora=True),
    # LightX2V's 4-step distilled InfiniteTalk (configs/infinitetalk/infinitetalk_480p_multi_distilled.json and
    # the 720p multi distilled configs): 4 steps, no guidance (enable_cfg false: one model call per step),
    # shift 11 at 480p and 7 at 720p. Runs the distilled DiT file, else the base DiT + the distill LoRA.
    "turbo": Preset(steps=4, text_guidance=1.0, audio_guidance=1.0, shift={"480p": 11.0, "720p": 7.0},
                    needs_distill_lora=True, distilled_dit=True),
}


@dataclass
class GenerationRequest:
    """Everything one job needs. Paths are local files; URL/data-URI fetching happens before this."""

    left_audio: Path | None  # None only with `stereo_audio`
    right_audio: Path | None
    out: Path
    image: Path | None = None
    video: Path | None = None
    mask_image: Path | None = None  # white = may move (both speakers); outside it stays as the source
    prompt: str | list[str] = DEFAULT_PROMPT  # one per line/item: successive windows
    negative_prompt: str | None = None  # None: the reference's default negative prompt
    order: str | None = None  # None: "meanwhile" for video input, "left_right" for image input
    resolution: str = "480p"
    seed: int = -1
    preset: str = "quality"
    steps: int | None = None  # None: the preset's
    text_guidance: float | None = None  # None: the preset's (text CFG: 5 quality, 1 fast / turbo)
    audio_guidance: float | None = None  # None: the preset's (audio CFG: 4 quality, 2 fast, 1 turbo)
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
    # One conversation file instead of left/right_audio: left channel = left person, right = right (meanwhile).
    stereo_audio: Path | None = None
    # TeaCache step skipping (quality recipe only; an approximation): threshold, 0 = off; the reference suggests
    # 0.1 (≈2× faster) … 0.2 (≈3×). Recorded in the output metadata when on.
    teacache: float = 0.0
    # Video input only: how much of each window is generated anew (1 = from pure noise, the reference; lower
    # starts from the window's source latents noised to that level, keeping more of the source's motion).
    denoise: float = 1.0

    # -- resolved values -------------------------------------------------------------------------
    def resolved(self) -> "GenerationRequest":
        """Validated copy with every default filled in (seed drawn when −1)."""
        self.validate()
        preset = PRESETS[self.preset]
        seed = self.seed if self.seed >= 0 else random.SystemRandom().randint(0, MAX_SEED)
        return replace(
            self,
            order=self.order or ("meanwhile" if self.video is not None or self.stereo_audio is not None
                                 else "left_right"),
            prompt=join_prompts(self.prompt),
            steps=self.steps or preset.steps,
            text_guidance=preset.text_guidance if self.text_guidance is None else self.text_guidance,
            audio_guidance=preset.audio_guidance if self.audio_guidance is None else self.audio_guidance,
            shift=self.shift if self.shift is not None else preset.shift_at(self.resolution),
            seed=seed,
        )

    def validate(self) -> None:
        if (self.image is None) == (self.video is None):
            raise InputError("image/video", "give exactly one of an image or a video showing the two people")
        if self.order is not None and self.order not in ORDERS:
            raise InputError("order", f"{self.order!r} is not one of {', '.join(ORDERS)}")
        if self.stereo_audio is not None:
            if self.left_audio is not None or self.right_audio is not None:
                raise InputError("stereo_audio", "give either one stereo conversation file or left and right audio, not both")
            if self.order not in (None, "meanwhile"):
                raise InputError("order", f"{self.order!r} does not apply to a stereo conversation file: its two "
                                          "channels already share one timeline (meanwhile)")
        elif self.left_audio is None or self.right_audio is None:
            raise InputError("left_audio/right_audio", "give both speakers' audio files (or one stereo conversation file)")
        join_prompts(self.prompt)
        if self.resolution not in RESOLUTIONS:
            raise InputError("resolution", f"{self.resolution!r} is not one of {', '.join(RESOLUTIONS)}")
        if not (-1 <= int(self.seed) <= MAX_SEED):
            raise InputError("seed", f"{self.seed} is outside -1 .. {MAX_SEED} (-1 = random)")
        if self.preset not in PRESETS:
            raise InputError("preset", f"{self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.steps is not None and not (1 <= self.steps <= 100):
            raise InputError("steps", f"{self.steps} is outside 1 .. 100")
        for name in ("text_guidance", "audio_guidance"):
            value = getattr(self, name)
            if value is not None and not (0.0 <= float(value) <= MAX_GUIDANCE):
                raise InputError(name, f"{value} is outside 0 .. {MAX_GUIDANCE:g}")
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
        if not (0.0 < float(self.denoise) <= 1.0):
            raise InputError("denoise", f"{self.denoise} is outside (0, 1] (1 = generate from pure noise)")
        if self.denoise < 1.0 and (self.video is None or self.mask_image is not None):
            raise InputError("denoise", "denoise below 1 starts from the source video's own frames: it needs a "
                                        "video input and no mask_image")
        if not (0.0 <= float(self.teacache) <= 1.0):
            raise InputError("teacache", f"{self.teacache} is outside 0 .. 1 (0 = off)")
        text = PRESETS[self.preset].text_guidance if self.text_guidance is None else float(self.text_guidance)
        if self.teacache and math.isclose(text, 1.0):
            raise InputError("teacache", f"step skipping needs the 3-call quality recipe; text_guidance {text:g} "
                                         "makes the 2-call fast recipe (use preset quality or teacache 0)")
        if Path(self.out).suffix.lower() != ".mp4":
            raise InputError("out", f"{self.out} must end in .mp4")
