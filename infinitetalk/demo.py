"""`python -m infinitetalk demo`: the whole pipeline end to end in seconds on a CPU, with tiny random
models, a drawn two-person picture and two synthetic voices. The video is noise-like (the weights are
random); the point is that every stage runs and a real mp4 with sound comes out."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

if TYPE_CHECKING:
    from .pipeline.generate import GenerationResult, ProgressHook

__all__ = ["two_faces_image", "synthetic_voice", "write_png", "make_demo_inputs", "run_demo"]

VOICE_RATE = 24000


def two_faces_image(height: int = 512, width: int = 768) -> np.ndarray:
    """uint8 [H, W, 3]: two simple cartoon faces (left and right) on a two-tone background."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    img[:] = (70, 110, 150)
    img[yy > 0.7 * height] = (120, 90, 60)                         # a table
    for cx, skin, shirt in ((0.27, (235, 195, 160), (40, 90, 200)), (0.73, (190, 140, 105), (200, 60, 50))):
        cx, cy, r = cx * width, 0.42 * height, 0.16 * min(height, width)
        body = ((xx - cx) / (1.6 * r)) ** 2 + ((yy - (cy + 2.3 * r)) / (1.4 * r)) ** 2 < 1
        img[body] = shirt
        face = ((xx - cx) / r) ** 2 + ((yy - cy) / (1.2 * r)) ** 2 < 1
        img[face] = skin
        for ex in (-0.38, 0.38):                                    # eyes
            img[(xx - (cx + ex * r)) ** 2 + (yy - (cy - 0.25 * r)) ** 2 < (0.12 * r) ** 2] = (30, 30, 30)
        mouth = ((xx - cx) / (0.45 * r)) ** 2 + ((yy - (cy + 0.5 * r)) / (0.12 * r)) ** 2 < 1
        img[mouth] = (150, 40, 50)
    return img.astype(np.uint8)


def synthetic_voice(seconds: float, pitch_hz: float, rate: int = VOICE_RATE, seed: int = 0) -> np.ndarray:
    """float32 [samples]: a voiced harmonic tone with syllable-like loudness envelopes and pitch wobble."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = pitch_hz * (1 + 0.06 * np.sin(2 * math.pi * 0.7 * t) + 0.03 * np.sin(2 * math.pi * 3.1 * t))
    phase = 2 * math.pi * np.cumsum(f0) / rate
    tone = sum((0.6 ** k) * np.sin(k * phase) for k in range(1, 8))
    env = np.zeros(n)
    pos = 0.05
    while pos < seconds - 0.1:                                     # syllables of 0.12-0.3 s with short gaps
        dur = rng.uniform(0.12, 0.3)
        a, b = int(pos * rate), min(n, int((pos + dur) * rate))
        env[a:b] = np.sin(np.linspace(0, math.pi, b - a)) ** 0.7
        pos += dur + rng.uniform(0.03, 0.15)
    return (0.3 * tone * env / np.abs(tone).max()).astype(np.float32)


def write_png(path: Path, image: np.ndarray) -> Path:
    """Write a uint8 [H, W, 3] image as PNG with PyAV."""
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        c.mux(s.encode(None))
    return Path(path)


def make_demo_inputs(folder: Path, seconds: float = 4.0) -> dict[str, Path]:
    """Write the demo picture and the two voices (left lower and slower, right higher) into `folder`."""
    from .audio.io import write_wav

    folder.mkdir(parents=True, exist_ok=True)
    half = seconds / 2
    return {
        "image": write_png(folder / "two_people.png", two_faces_image()),
        "left_audio": write_wav(folder / "left.wav", synthetic_voice(half, 120.0, seed=1)[None], VOICE_RATE),
        "right_audio": write_wav(folder / "right.wav", synthetic_voice(half, 210.0, seed=2)[None], VOICE_RATE),
    }


def run_demo(out: Path = Path("demo.mp4"), cache_dir: Path | None = None, seconds: float = 4.0,
             progress: ProgressHook | None = None, steps: int = 2, size_scale: float = 0.125,
             frame_num: int = 81, motion_frames: int = 9) -> GenerationResult:
    """Tiny models (made once into `cache_dir`, or a temporary folder), synthetic inputs, one CPU job."""
    from .pipeline.generate import generate
    from .pipeline.models import load_models
    from .pipeline.request import GenerationRequest
    from .tiny import make_tiny_models

    with tempfile.TemporaryDirectory(prefix="infinitetalk-demo-") as tmp:
        models_dir = Path(cache_dir) if cache_dir is not None else Path(tmp) / "models"
        if not (models_dir / ".complete").is_file():
            make_tiny_models(models_dir, seed=0)
            (models_dir / ".complete").write_text("tiny models written by `python -m infinitetalk demo`\n")
        inputs = make_demo_inputs(Path(tmp) / "inputs", seconds)
        models = load_models(models_dir, preset="quality", device="cpu", dtype="fp32")
        request = GenerationRequest(left_audio=inputs["left_audio"], right_audio=inputs["right_audio"],
                                    image=inputs["image"], out=Path(out), order="left_right", seed=0,
                                    steps=steps, size_scale=size_scale, job_dir=Path(tmp) / "job",
                                    frame_num=frame_num, motion_frames=motion_frames,
                                    prompt="Two cartoon people take turns talking.")
        return generate(request, models, progress=progress)
