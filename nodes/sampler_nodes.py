"""InfiniteTalkMultiSampler: the whole long-video job (all windows) in one node, streamed to an mp4."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from infinitetalk.errors import InputError
from infinitetalk.pipeline.progress import ProgressInfo
from infinitetalk.pipeline.request import MAX_GUIDANCE, MAX_SEED, ORDERS, PRESETS, RESOLUTIONS, GenerationRequest
from infinitetalk.pipeline.schedule import SHIFT_BY_RESOLUTION
from infinitetalk.text.prompts import DEFAULT_PROMPT

from . import bridge, media
from .status import JobStatus
from .types import InfiniteTalkVideo

FRAMES_LIMIT_MB = 2048
DEFAULT_PRESET = "fast"
FRAMES_OUTPUT = 1  # index of 'frames' in RETURN_TYPES
FPS = 25


def preset_values() -> dict[str, dict]:
    """preset -> the widget values it stands for; the web extension fills them in when the preset changes."""
    return {name: {"steps": p.steps, "text_guidance": p.text_guidance, "audio_guidance": p.audio_guidance}
            for name, p in PRESETS.items()}


def preset_tooltip() -> str:
    """What each preset stands for, from the preset data (a preset added there shows up here)."""
    lines = [f"{name}: {p.steps} steps, text guidance {p.text_guidance:g}, audio guidance {p.audio_guidance:g}"
             + ("; needs a step-distill LoRA (lightx2v / FusionX) in the loader" if p.needs_distill_lora else "")
             for name, p in PRESETS.items()]
    return ". ".join(lines) + ". Choosing a preset fills steps and both guidances; edit them after to override."


def frames_output_used(prompt: Any, unique_id: Any) -> bool:
    """Whether any node of the queued graph reads this node's 'frames' output (True when unknown)."""
    if not isinstance(prompt, dict) or unique_id is None:
        return True
    for node in prompt.values():
        for value in (node.get("inputs") or {}).values() if isinstance(node, dict) else ():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(unique_id) \
                    and value[1] == FRAMES_OUTPUT:
                return True
    return False


def frames_limit_error(frames: int, height: int, width: int, limit_mb: int) -> InputError:
    """The error for a 'frames' output that would not fit: says how many MB to allow instead."""
    need_mb = -(-frames * height * width * 3 * 4 // 2**20)
    return InputError("frames_limit_mb", f"the 'frames' output ({frames} frames of {width}x{height}, float32) needs "
                                         f"about {need_mb} MB but frames_limit_mb is {limit_mb}: raise frames_limit_mb "
                                         f"to {need_mb} or more, or disconnect 'frames' and use 'video' (streamed "
                                         "from disk). Finished windows are kept: queueing again resumes.")


def _frames_fit(frames: int, height: int, width: int, limit_mb: int) -> bool:
    """Whether `frames` IMAGE frames (float32) stay under the user's RAM limit."""
    return limit_mb > 0 and frames * height * width * 3 * 4 <= limit_mb * 2**20


class _FrameCollector:
    """Keeps finished windows' frames for the 'frames' output; an error naming frames_limit_mb when the
    whole video (estimated from the audio length at the first window) or the frames so far would not fit.

    `expected` is the estimated frame count; `used` False (output not connected) collects nothing."""

    def __init__(self, limit_mb: int, expected: int, used: bool = True):
        self.limit_mb, self.expected, self.used = int(limit_mb), int(expected), used
        self.chunks: list[np.ndarray] = []
        self.count = 0

    def add(self, frames: np.ndarray) -> None:
        if not self.used:
            return
        n, h, w = frames.shape[:3]
        total = max(self.count + n, self.expected)
        if not _frames_fit(total, h, w, self.limit_mb):
            raise frames_limit_error(total, h, w, self.limit_mb)
        self.chunks.append(np.ascontiguousarray(frames))
        self.count += n

    def image(self, keep: int, placeholder: np.ndarray | None) -> torch.Tensor:
        """IMAGE [N,H,W,3] of the first `keep` frames; the last frame alone when the output is not connected."""
        if self.used and self.chunks:
            frames = np.concatenate(self.chunks)[:keep]
            return torch.from_numpy(frames).float().div_(255.0)
        if placeholder is None:
            placeholder = np.zeros((64, 64, 3), np.uint8)
        return torch.from_numpy(np.ascontiguousarray(placeholder))[None].float().div_(255.0)


class InfiniteTalkMultiSampler:
    """Two people, one picture (or video), two voices: the full lip-synced video, however long the audio."""

    DESCRIPTION = ("Generates the whole two-person talking video in one go: the audio decides the length, the "
                   "job runs window after window (81 frames, 9 overlapping) with one progress bar, a preview per "
                   "finished window and Cancel honoured between steps. Frames are streamed into an mp4 in the "
                   "temp folder, so a 10-minute video never sits in RAM; connect 'video' to InfiniteTalk Video "
                   "Combine to save it.")
    CATEGORY = "InfiniteTalk"
    SEARCH_ALIASES = ["InfiniteTalk", "talking video", "lip sync", "multitalk"]  # the node search also matches these
    FUNCTION = "generate"
    RETURN_TYPES = ("INFINITETALK_VIDEO", "IMAGE", "AUDIO", "VIDEO", "FLOAT", "INT")
    RETURN_NAMES = ("video", "frames", "audio", "comfy_video", "fps", "seed")
    OUTPUT_TOOLTIPS = (
        "The finished mp4 (temp folder) with its frame count, fps, length and seed: connect to InfiniteTalk Video Combine.",
        "All frames as an IMAGE batch (float32 in RAM: ~4.6 MB a frame at 832x480). Past frames_limit_mb the job "
        "stops with an error saying what to raise; use 'video' (streamed from disk) for long videos.",
        "The mixed audio track of the video (left and right voices placed by 'order').",
        "The same mp4 as a core VIDEO (for Save Video / Get Video Components).",
        "Frames per second of the video (25).",
        "The seed actually used (a drawn one when seed is -1).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fast = PRESETS[DEFAULT_PRESET]
        return {
            "required": {
                "models": ("INFINITETALK_MODELS", {"tooltip": "The models from InfiniteTalk Model Loader."}),
                "left_audio": ("AUDIO", {"tooltip": "Voice of the person on the LEFT of the picture."}),
                "right_audio": ("AUDIO", {"tooltip": "Voice of the person on the RIGHT of the picture."}),
                "prompt": ("STRING", {"default": DEFAULT_PROMPT, "multiline": True,
                                      "tooltip": "What the scene looks like and what happens (English or Chinese). "
                                      "Several lines: successive windows take successive lines (the first "
                                      "window 81 frames, 3.2 s; each next one 72 new frames, 2.9 s), the last "
                                      "line repeating."}),
                "negative_prompt": ("STRING", {"default": "", "multiline": True,
                                               "tooltip": "What to avoid; empty = the model's standard negative prompt."}),
                "order": (list(ORDERS), {"default": "left_right", "tooltip":
                          "meanwhile: both tracks play at the same time (length = longer track); left_right: left "
                          "speaks first, then right (length = sum); right_left: right first, then left."}),
                "resolution": (list(RESOLUTIONS), {"default": "480p", "tooltip":
                               "Output size bucket (aspect ratio kept from the picture): 480p is the model's "
                               "trained size and fast; 720p is sharper and ~2.5x slower."}),
                "seed": ("INT", {"default": 42, "min": -1, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Noise seed; -1 draws a new one every run. The seed used is shown on the node when the "
                                 "video is done and given on the 'seed' output."}),
                "preset": (list(PRESETS), {"default": DEFAULT_PRESET, "presets": preset_values(), "tooltip":
                           preset_tooltip()}),
                "steps": ("INT", {"default": fast.steps, "min": 1, "max": 100, "tooltip":
                                  "Denoising steps per window (turbo 4, fast 6, quality 40); set by the preset."}),
                "text_guidance": ("FLOAT", {"default": fast.text_guidance, "min": 0.0, "max": MAX_GUIDANCE,
                                            "step": 0.1, "tooltip":
                                            "Text CFG: how strongly the prompt is followed (fast 1 = off, one "
                                            "model call saved; quality 5). Set by the preset."}),
                "audio_guidance": ("FLOAT", {"default": fast.audio_guidance, "min": 0.0, "max": MAX_GUIDANCE,
                                             "step": 0.1, "tooltip":
                                             "Audio CFG: how strongly the lips follow the voices (turbo 1 = off, "
                                             "fast 2, quality 4). Not the audio's loudness. Set by the preset."}),
                "color_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                                             "How strongly each window's colours are matched to the reference "
                                             "(stops colour drift on long videos); 0 = off."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "Picture of the two people (give this OR video)."}),
                "video": ("VIDEO,IMAGE", {"tooltip": "Video of the two people to re-animate (a core VIDEO or an "
                                          "IMAGE batch at 25 fps); give this OR image."}),
                "left_mask": ("MASK", {"tooltip": "Where the LEFT person is (white = that person), e.g. from "
                                       "InfiniteTalk Mask From Region; default: the left half."}),
                "right_mask": ("MASK", {"tooltip": "Where the RIGHT person is; default: the right half."}),
                "mask_image": ("MASK,IMAGE", {"tooltip": "Regions allowed to move (white); everything else is "
                                              "kept as in the input. Optional."}),
                "size_scale": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 1.0, "step": 0.05, "advanced": True,
                                         "tooltip": "Shrinks the output size (quick previews, tests); 1.0 for real use."}),
                "frames_limit_mb": ("INT", {"default": FRAMES_LIMIT_MB, "min": 0, "max": 1 << 20, "advanced": True,
                                            "tooltip": "Largest 'frames' IMAGE output in MB (float32). A longer "
                                            "video with 'frames' connected stops with an error saying what to "
                                            "set; with 'frames' unconnected nothing is kept in RAM."}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.5, "advanced": True,
                                    "tooltip": "Timestep shift of the flow-matching schedule (higher = more steps "
                                    "spent on coarse motion); 0 = the preset's (" + "; ".join(
                                        name + " " + ", ".join(f"{p.shift_at(r):g} at {r}" for r in SHIFT_BY_RESOLUTION)
                                        for name, p in PRESETS.items()) + ")."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 1.0, "step": 0.05, "advanced": True,
                                      "tooltip": "Video input only: how much of each window is made anew. 1 = from "
                                      "pure noise (the reference); lower starts from the source video's own "
                                      "frames, keeping more of their motion (fewer steps run). Not with mask_image."}),
                "teacache": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "advanced": True,
                                       "tooltip": "TeaCache step skipping threshold (0 = off): 0.1 is about 2x, "
                                       "0.2 about 3x faster, approximate. Only for the 3-call recipe (text "
                                       "guidance above 1, e.g. preset quality); recorded in the video's metadata."}),
            },
            # 'prompt' is the text prompt here, so the queued graph comes in as 'queued_graph'
            "hidden": {"queued_graph": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, seed: int, **_) -> Any:
        """seed -1 draws a new seed every run, so such a job is never served from ComfyUI's cache (NaN != NaN)."""
        return float("nan") if int(seed) == -1 else str(seed)

    @classmethod
    def VALIDATE_INPUTS(cls, seed: int, steps: int) -> bool | str:
        if not -1 <= int(seed) <= MAX_SEED:
            return f"seed: {seed} is outside -1 .. {MAX_SEED}"
        if not 1 <= int(steps) <= 100:
            return f"steps: {steps} is outside 1 .. 100"
        return True

    def generate(self, models: Any, left_audio: dict, right_audio: dict, prompt: str, negative_prompt: str,
                 order: str, resolution: str, seed: int, preset: str, steps: int, text_guidance: float,
                 audio_guidance: float, color_strength: float, image: Any = None, video: Any = None,
                 left_mask: Any = None, right_mask: Any = None, mask_image: Any = None, size_scale: float = 1.0,
                 frames_limit_mb: int = FRAMES_LIMIT_MB, shift: float = 0.0, denoise: float = 1.0,
                 teacache: float = 0.0,
                 queued_graph: Any = None, unique_id: Any = None) -> tuple:
        from infinitetalk.pipeline.generate import generate

        if (image is None) == (video is None):
            raise InputError("image/video", "connect exactly one of 'image' (a picture) or 'video' showing the two people")
        out = media.temp_file(".mp4", "infinitetalk")
        request = GenerationRequest(
            left_audio=media.audio_to_file(left_audio, "left_audio"),
            right_audio=media.audio_to_file(right_audio, "right_audio"),
            out=out,
            image=media.image_to_file(image, "image") if image is not None else None,
            video=media.video_to_file(video, "video") if video is not None else None,
            mask_image=_mask_image_file(mask_image),
            prompt=prompt.strip() or DEFAULT_PROMPT,
            negative_prompt=negative_prompt.strip() or None,
            order=order, resolution=resolution, seed=int(seed), preset=preset,
            steps=int(steps),
            text_guidance=float(text_guidance),
            audio_guidance=float(audio_guidance),
            color_strength=float(color_strength),
            size_scale=float(size_scale),
            shift=float(shift) or None,
            denoise=float(denoise),
            teacache=float(teacache),
            **_speaker_masks(left_mask, right_mask),
        )
        request.validate()
        status = JobStatus()   # the node's text ends on the outcome, never on a stale "loading" or "window 2/5"
        with status.outcome(int(seed)):
            bundle = models.load(preset) if hasattr(models, "load") else models
        request.job_dir = _job_dir(request, bundle)
        bar: list[bridge.Progress] = []
        collector = _FrameCollector(int(frames_limit_mb), _expected_frames(left_audio, right_audio, request.order),
                                    frames_output_used(queued_graph, unique_id))
        last = {}

        def progress(done: int, total: int, info: ProgressInfo) -> None:
            if not bar:
                bar.append(bridge.Progress(total))
            bar[0].update(done, total)
            status(done, total, info)

        def on_window(index: int, frames: np.ndarray) -> None:
            frames = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
            last["frame"] = frames[-1]
            collector.add(frames)
            if bar:
                bar[0].preview(frames[-1])

        def run() -> Any:
            with status.outcome(int(seed)):
                return generate(request, bundle, progress=progress, cancel=bridge.interrupted, on_window=on_window,
                                sampler=getattr(models, "sampler", None))

        bridge.make_room_for(models.core_entry() if hasattr(models, "core_entry") else None)
        status.say("checking the inputs and the memory plan")
        result = bridge.guarded(run)
        bridge.soft_empty_cache()
        status.finished(result.frames, 25.0, int(result.seed), result.elapsed_s)
        info = InfiniteTalkVideo.from_file(Path(result.path), seed=int(result.seed))
        frames = collector.image(info.frames, last.get("frame")) if collector.used else bridge.blocked_output(
            "InfiniteTalk Multi Sampler's 'frames' output was not connected when this video was made, so its frames "
            "were not kept: change any sampler input (e.g. seed) to make it again, or use 'video'.")
        return (info, frames, media.audio_from_clip(*result.audio), bridge.core_video(info.path), float(info.fps), int(info.seed))


def _expected_frames(left_audio: dict, right_audio: dict, order: str | None) -> int:
    """Frames the video will have, from the audio lengths (25 fps): the sum one after the other, else the longer."""
    from infinitetalk.audio.placement import placed_seconds

    return int(placed_seconds(order, media.audio_seconds(left_audio), media.audio_seconds(right_audio)) * FPS)


def _job_dir(request: GenerationRequest, bundle: Any) -> Path:
    """A job folder named by the job's content (not its paths), so re-queueing a cancelled job — here or, with
    a shared `INFINITETALK_JOBS_DIR`, on another server — resumes its finished windows."""
    from infinitetalk.pipeline.job import fingerprint

    identity = bundle.identity() if hasattr(bundle, "identity") else type(bundle).__name__
    return bridge.jobs_dir() / fingerprint(request, identity)[:24]


def _mask_image_file(mask_image: Any) -> Path | None:
    """mask_image may be a MASK or an IMAGE (white = may move); written as a grey PNG."""
    if mask_image is None:
        return None
    t = torch.as_tensor(mask_image)
    if t.ndim == 4:  # IMAGE [B,H,W,C]: luminance
        t = t[0, ..., :3].float().mean(dim=-1)
    return media.mask_to_file(t, "mask_image")


def _speaker_masks(left_mask: Any, right_mask: Any) -> dict:
    """Explicit speaker masks go to the pipeline as grey PNG files (request.left_mask / right_mask)."""
    if (left_mask is None) != (right_mask is None):
        missing = "right_mask" if right_mask is None else "left_mask"
        raise InputError(missing, "connect both left_mask and right_mask, or neither (then the halves of the frame are used)")
    if left_mask is None:
        return {}
    left = media.mask_float(left_mask, "left_mask")
    right = media.mask_float(right_mask, "right_mask")
    for name, m in (("left_mask", left), ("right_mask", right)):
        if float(m.max()) <= 0.5:
            raise InputError(name, "the mask is empty (no white pixels): it must cover that person's face")
    if left.shape != right.shape:
        raise InputError("right_mask", f"size {right.shape[::-1]} differs from left_mask's {left.shape[::-1]}")
    return {"left_mask": media.mask_to_file(left_mask, "left_mask"),
            "right_mask": media.mask_to_file(right_mask, "right_mask")}

