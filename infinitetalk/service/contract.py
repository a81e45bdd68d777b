"""The hosted InfiniteTalk-multi REST contract: request fields, validation, response envelope, billing.

Same field names and semantics as the hosted offerings (WaveSpeed `infinitetalk/*-multi`), so a
pipeline written against them can point at a ComfyUI server running this package.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..pipeline.request import MAX_SEED, ORDERS, RESOLUTIONS

MODELS = {
    "image-to-video-multi": "infinitetalk/image-to-video-multi",
    "video-to-video-multi": "infinitetalk/video-to-video-multi",
}
# Service tiers (body field `tier`; the drop-in fast routes set it) -> the sampler preset their jobs run:
# standard keeps the shipped workflow's own sampler settings, fast runs `turbo` (4 steps, one DiT call each).
TIERS: dict[str, str | None] = {"standard": None, "fast": "turbo"}
STATUSES = ("created", "processing", "completed", "failed")
MAX_SECONDS = 600.0
BILLING_MIN_SECONDS = 5
BILLING_CAP_SECONDS = 600
MAX_PROMPT_CHARS = 4000
MAX_WINDOW_PROMPTS = 200   # a list `prompt`: one per window (81 frames); 600 s of video is under 200 windows
# Size caps while streaming an input (bytes).
SIZE_CAPS = {"image": 50 * 2**20, "mask_image": 50 * 2**20, "video": 100 * 2**20,
             "left_audio": 50 * 2**20, "right_audio": 50 * 2**20}
MEDIA_FIELDS = ("image", "video", "mask_image", "left_audio", "right_audio")


class ApiError(Exception):
    """A refusal in the contract's shape: HTTP status = `code`, `message` says what and why."""

    def __init__(self, code: int, message: str, retry_after_s: int | None = None):
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s   # sent as `Retry-After` (503, 429)
        super().__init__(f"{code}: {message}")

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


@dataclass
class JobRequest:
    """A validated submission (media fields still as given: URL, data URI or input-folder name)."""

    kind: str  # key of MODELS
    media: dict[str, str]
    prompt: str
    order: str
    resolution: str
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)
    tier: str = "standard"  # key of TIERS

    @property
    def model(self) -> str:
        """The hosted model name, e.g. infinitetalk/image-to-video-multi (infinitetalk-fast/... on the fast tier)."""
        return MODELS[self.kind].replace("infinitetalk/", "infinitetalk-fast/", self.tier == "fast")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "media": self.media, "prompt": self.prompt, "order": self.order,
                "resolution": self.resolution, "seed": self.seed, "tier": self.tier}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "JobRequest":
        return cls(kind=d["kind"], media=dict(d["media"]), prompt=d["prompt"], order=d["order"],
                   resolution=d["resolution"], seed=int(d["seed"]), tier=d.get("tier", "standard"))


def _string(body: dict, name: str, required: bool) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise ApiError(400, f"missing required field '{name}'")
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"field '{name}' must be a string (https URL, data: URI or uploaded file name)")
    return value


def _choice(body: dict, name: str, allowed: tuple[str, ...], default: str) -> str:
    """A string field from `allowed`; absent, null or "" means `default` (0, false, [] are refused)."""
    value = body.get(name)
    if value is None or value == "":
        return default
    if value not in allowed:
        raise ApiError(400, f"field '{name}' must be one of {', '.join(allowed)}; got {value!r}")
    return value


def validate_request(kind: str, body: Any) -> JobRequest:
    """Check a submission body against the contract; raises ApiError(400) naming the field."""
    if kind not in MODELS:
        raise ApiError(404, f"unknown model route '{kind}'; available: {', '.join(MODELS)}")
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    visual = "image" if kind == "image-to-video-multi" else "video"
    other = "video" if visual == "image" else "image"
    if body.get(other) not in (None, ""):
        raise ApiError(400, f"field '{other}' is not accepted by {kind}; send '{visual}'")
    media = {visual: _string(body, visual, True)}
    media["left_audio"] = _string(body, "left_audio", True)
    media["right_audio"] = _string(body, "right_audio", True)
    mask = _string(body, "mask_image", False)
    if mask is not None:
        media["mask_image"] = mask
    prompt = body.get("prompt", "")
    if prompt is None:
        prompt = ""
    if isinstance(prompt, list):   # one prompt per window, the last repeating: the newline form of the graph
        if not 1 <= len(prompt) <= MAX_WINDOW_PROMPTS or not all(isinstance(p, str) and p.strip() and "\n" not in p
                                                                 for p in prompt):
            raise ApiError(400, f"field 'prompt' as a list must hold 1 .. {MAX_WINDOW_PROMPTS} non-empty one-line "
                                "strings (one per window)")
        prompt = "\n".join(p.strip() for p in prompt)
    if not isinstance(prompt, str):
        raise ApiError(400, "field 'prompt' must be a string or a list of strings (one per window)")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"field 'prompt' is longer than {MAX_PROMPT_CHARS} characters")
    order = _choice(body, "order", ORDERS, "meanwhile" if visual == "video" else "left_right")
    resolution = _choice(body, "resolution", RESOLUTIONS, "480p")
    seed = body.get("seed")
    if seed is None:   # absent or null: the default, as for every optional field
        seed = -1
    if isinstance(seed, bool) or not isinstance(seed, (int, float)) or (isinstance(seed, float) and not seed.is_integer()):
        raise ApiError(400, f"field 'seed' must be an integer in -1 .. {MAX_SEED}; got {seed!r}")
    seed = int(seed)
    if not (-1 <= seed <= MAX_SEED):
        raise ApiError(400, f"field 'seed' must be in -1 .. {MAX_SEED} (-1 = random); got {seed}")
    tier = _choice(body, "tier", tuple(TIERS), "standard")
    return JobRequest(kind=kind, media=media, prompt=prompt, order=order, resolution=resolution, seed=seed, tier=tier)


def billed_seconds(video_seconds: float) -> int:
    """Per started second, at least 5 s, at most 600 s."""
    return int(min(BILLING_CAP_SECONDS, max(BILLING_MIN_SECONDS, math.ceil(max(0.0, video_seconds) - 1e-9))))


def audio_seconds_for(order: str, left_seconds: float, right_seconds: float) -> float:
    """Duration of the placed audio (= the video) for a speaking order (the placement's own rule)."""
    from ..audio.placement import placed_seconds

    return placed_seconds(order, left_seconds, right_seconds)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(data: Any = None, code: int = 200, message: str = "success") -> dict[str, Any]:
    return {"code": code, "message": message, "data": data}


def error_envelope(err: ApiError) -> dict[str, Any]:
    return envelope(None, err.code, err.message)


# An absolute POSIX or Windows path inside a message (not the path part of a URL: no host before it).
_ABS_PATH = re.compile(r"(?<![\w.:/\\>-])(?!(?:/api)?/infinitetalk/v1/)(?:/|[A-Za-z]:[\\/])(?:[^\s'\"<>|:*?,;()\[\]]+[\\/])*([^\s'\"<>|:*?,;()\[\]\\/]*)")


def public_message(message: str, folders: dict[str, Path]) -> str:
    """`message` without absolute server paths: a path inside a known folder becomes `<label>/relative`,
    any other absolute path just its file name. Clients never learn the server's layout."""
    for label, folder in sorted(folders.items(), key=lambda kv: -len(str(kv[1]))):
        for root in {str(folder), str(Path(folder).resolve())}:
            if root and root not in ("/", "."):
                message = message.replace(root.rstrip("/\\") + "/", f"<{label}>/").replace(root, f"<{label}>")
    return _ABS_PATH.sub(lambda m: m.group(1) or "<server path>", message)
