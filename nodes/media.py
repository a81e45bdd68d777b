"""Conversions between ComfyUI's in-memory types (IMAGE, MASK, AUDIO, VIDEO) and the files a job reads.

The pipeline takes files (it streams long media instead of holding it); the nodes hand it ComfyUI
tensors written once into the temp folder. PyAV does all encoding: no other imaging dependency.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infinitetalk.errors import InputError

from . import bridge


def temp_file(suffix: str, stem: str = "infinitetalk") -> Path:
    folder = bridge.temp_dir() / "infinitetalk"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}_{uuid.uuid4().hex[:12]}{suffix}"


# -- audio -----------------------------------------------------------------------------------------
def audio_from_clip(samples: Any, sample_rate: int) -> dict:
    """AUDIO dict {"waveform": [1,C,T] float32, "sample_rate"} from [C,T] samples."""
    wave = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    if wave.ndim == 1:
        wave = wave[None]
    return {"waveform": wave[None].contiguous(), "sample_rate": int(sample_rate)}


def audio_parts(audio: Any, name: str) -> tuple[np.ndarray, int]:
    """([C,T] float32 samples, sample rate) of the first item of an AUDIO input; checks its shape."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise InputError(name, "expected an AUDIO value ({'waveform': [B,C,T], 'sample_rate': int})")
    wave = torch.as_tensor(audio["waveform"]).detach().float().cpu()
    if wave.ndim == 3:
        wave = wave[0]
    elif wave.ndim == 1:
        wave = wave[None]
    if wave.ndim != 2 or wave.shape[-1] == 0:
        raise InputError(name, f"audio waveform has shape {tuple(audio['waveform'].shape)}; expected [B,C,T] with T > 0")
    return wave.numpy(), int(audio["sample_rate"])


def audio_seconds(audio: dict) -> float:
    return float(audio["waveform"].shape[-1]) / float(audio["sample_rate"])


def audio_to_file(audio: Any, name: str) -> Path:
    from infinitetalk.audio.io import write_wav

    samples, rate = audio_parts(audio, name)
    return write_wav(temp_file(".wav", name), samples, rate)


# -- images and masks ------------------------------------------------------------------------------
def image_uint8(image: Any, name: str) -> np.ndarray:
    """uint8 [B,H,W,3] from an IMAGE tensor [B,H,W,C] in 0..1 (alpha dropped, grey expanded)."""
    t = torch.as_tensor(image).detach().cpu()
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[-1] not in (1, 3, 4) or t.shape[0] == 0:
        raise InputError(name, f"expected an IMAGE tensor [B,H,W,3], got shape {tuple(t.shape)}")
    t = t[..., :3] if t.shape[-1] != 1 else t.expand(*t.shape[:3], 3)
    return (t.float().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


def mask_float(mask: Any, name: str) -> np.ndarray:
    """float32 [H,W] in 0..1 from a MASK ([B,H,W] first item, or [H,W])."""
    t = torch.as_tensor(mask).detach().float().cpu()
    if t.ndim == 3:
        t = t[0]
    if t.ndim != 2 or t.numel() == 0:
        raise InputError(name, f"expected a MASK tensor [B,H,W], got shape {tuple(torch.as_tensor(mask).shape)}")
    return t.clamp(0, 1).numpy()


def write_png(pixels: np.ndarray, path: Path) -> Path:
    """Lossless PNG of uint8 [H,W,3] (rgb24) or [H,W] (gray) pixels."""
    import av

    pixels = np.ascontiguousarray(pixels)
    fmt = "gray" if pixels.ndim == 2 else "rgb24"
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height = pixels.shape[1], pixels.shape[0]
        stream.pix_fmt = fmt
        for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format=fmt)):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def image_to_file(image: Any, name: str) -> Path:
    return write_png(image_uint8(image, name)[0], temp_file(".png", name))


def mask_to_file(mask: Any, name: str) -> Path:
    return write_png((mask_float(mask, name) * 255.0).round().astype(np.uint8), temp_file(".png", name))


# -- video -----------------------------------------------------------------------------------------
def frames_to_mp4(frames: np.ndarray, path: Path, fps: float = 25.0, crf: int = 12, audio: tuple | None = None,
                  pix_fmt: str = "yuv420p", metadata: dict | None = None) -> Path:
    """Encode uint8 [N,H,W,3] frames (even sizes padded by the writer's rules) into an mp4."""
    from infinitetalk.video.writer import Mp4Writer

    n, h, w, _ = frames.shape
    with Mp4Writer(path, w, h, fps=fps, crf=crf, pix_fmt=pix_fmt, audio=audio, metadata=metadata or {}) as writer:
        for start in range(0, n, 16):
            writer.write(frames[start:start + 16])
    return Path(path)


def video_to_file(video: Any, name: str) -> Path:
    """A file path for a VIDEO input: core VIDEO objects (file-backed or in memory) or an IMAGE batch."""
    if isinstance(video, (str, Path)):
        path = Path(video)
        if not path.is_file():
            raise InputError(name, f"video file {path} does not exist")
        return path
    if isinstance(video, torch.Tensor):  # an IMAGE batch used as the source video (25 fps)
        return frames_to_mp4(image_uint8(video, name), temp_file(".mp4", name))
    if hasattr(video, "get_stream_source"):
        trim = video.get_active_trim_window() if hasattr(video, "get_active_trim_window") else (0.0, 0.0)
        source = video.get_stream_source()
        if isinstance(source, (str, Path)) and not any(trim):
            return Path(source)
    if hasattr(video, "save_to"):
        path = temp_file(".mp4", name)
        video.save_to(str(path))
        return path
    if hasattr(video, "get_components"):
        parts = video.get_components()
        audio = None
        if getattr(parts, "audio", None) is not None:
            audio = audio_parts(parts.audio, name)
        return frames_to_mp4(image_uint8(parts.images, name), temp_file(".mp4", name),
                             fps=float(parts.frame_rate), audio=audio)
    raise InputError(name, f"expected a VIDEO (core Load Video) or an IMAGE batch, got {type(video).__name__}")
