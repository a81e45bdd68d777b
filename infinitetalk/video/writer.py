"""Streaming mp4 writer (PyAV): H.264 video written frame by frame, AAC audio trimmed to the video, atomic finish.

Frames go into a hidden temp file next to the output (`.NAME.partial.mp4`); `close()` encodes the audio
(trimmed or silence-padded to exactly frames/fps seconds), finishes the file and renames it onto the final
name. `abort()` — also called by `with` on an exception — deletes the temp file, so nothing half-written ever
sits under the output name.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

import av
import numpy as np
import torch

from ..audio.io import AudioClip, resample
from ..errors import InputError, OutOfSpace, is_out_of_space
from ..files import atomic_write

__all__ = ["Mp4Writer", "pick_video_encoder", "to_uint8_frames", "aac_output_format", "check_audio_encodes",
           "aac_ready_audio"]

log = logging.getLogger(__name__)

# container by file suffix -> its audio encoder (None: the format has no audio track); mp4 for anything else
CONTAINERS = {".mp4": ("mp4", "aac"), ".mov": ("mov", "aac"), ".webm": ("webm", "libopus"), ".gif": ("gif", None)}
OPUS_RATE = 48000   # the rate the Opus encoder is given (it takes 48 kHz and a few lower ones)
# video encoder -> its options beyond the pixel format ({crf}: the quality asked for)
_ENCODER_OPTIONS = {"libvpx-vp9": {"crf": "{crf}", "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"},
                    "prores_ks": {"profile": "3"}}   # ProRes 422 HQ

# Sample rates the AAC encoder accepts; other rates are resampled to 48 kHz.
_AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350})



def aac_output_format(sample_rate: int, channels: int) -> tuple[int, str]:
    """(sample rate, layout) the muxed AAC track gets for audio of this rate and channel count: rates AAC
    lacks become 48 kHz, more than two channels are mixed down to stereo."""
    rate = int(sample_rate) if int(sample_rate) in _AAC_RATES else 48000
    return rate, "mono" if int(channels) == 1 else "stereo"


def aac_ready_audio(samples: torch.Tensor | np.ndarray, sample_rate: int) -> tuple[np.ndarray, int, str]:
    """Audio `[C, T]` as the AAC encoder takes it: float32 in [−1, 1], at most two channels (more are averaged
    to both), at a rate AAC has (else resampled to 48 kHz). Returns (samples, rate, layout)."""
    x = torch.as_tensor(samples, dtype=torch.float32)
    if x.dim() == 1:
        x = x[None]
    rate, layout = aac_output_format(sample_rate, x.shape[0])
    if rate != int(sample_rate):
        x = resample(x, int(sample_rate), rate)
    if x.shape[0] > 2:
        x = x.mean(0, keepdim=True).expand(2, -1)
    return np.ascontiguousarray(x.clamp(-1, 1).numpy()), rate, layout


def check_audio_encodes(sample_rate: int, channels: int, field: str = "audio") -> None:
    """Open (and drop) the AAC encoder for the output format of this audio, so a format the encoder
    refuses fails before any model work instead of after the last frame. InputError(field)."""
    rate, layout = aac_output_format(sample_rate, channels)
    try:
        ctx = av.CodecContext.create("aac", "w")
        ctx.sample_rate, ctx.layout, ctx.format = rate, layout, "fltp"
        ctx.bit_rate = 128_000
        ctx.open()
    except (av.FFmpegError, ValueError) as exc:
        raise InputError(field, f"the output audio ({sample_rate} Hz, {channels} channels → AAC {rate} Hz "
                                f"{layout}) cannot be encoded ({exc})") from None


# Preferred H.264 encoders, best first; mpeg4 is the last resort (plays everywhere, bigger files).
_ENCODERS = ("libx264", "libopenh264", "mpeg4")


# /proc/cpuinfo flag -> x264 CPU name, for the instruction sets below AVX-512 (see x264_cpu_flags).
_X264_CPU_NAMES = (("mmxext", "MMX2"), ("sse", "SSE"), ("sse2", "SSE2"), ("pni", "SSE3"), ("ssse3", "SSSE3"),
                   ("sse4_1", "SSE4.1"), ("sse4_2", "SSE4.2"), ("abm", "LZCNT"), ("avx", "AVX"), ("fma", "FMA3"),
                   ("bmi1", "BMI1"), ("bmi2", "BMI2"), ("avx2", "AVX2"))


@functools.lru_cache(maxsize=1)
def x264_cpu_flags() -> str | None:
    """x264 `asm=` value that leaves out AVX-512, or None to keep x264's own detection.

    x264's AVX-512 kernels in the PyAV wheels make the output differ from run to run for identical frames
    (seen on AVX-512 CPUs at several frame sizes, also single-threaded; without AVX-512 it is bit-stable),
    which would break "same seed -> same file" and resume. Only the CPU's own flags are passed.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if "avx512f" not in flags:
        return None
    names = [name for flag, name in _X264_CPU_NAMES if flag in flags]
    return ",".join(names) if "sse2" in flags else None


def pick_video_encoder() -> str:
    """The best available encoder of `_ENCODERS` in this PyAV build (warns when it is not libx264)."""
    available = av.codecs_available
    for name in _ENCODERS:
        if name in available:
            try:
                av.codec.Codec(name, "w")
            except Exception:  # noqa: BLE001 - listed but unusable
                continue
            if name != "libx264":
                log.warning("PyAV has no libx264 encoder; writing video with %s instead", name)
            return name
    raise RuntimeError("this PyAV build has no usable video encoder (tried %s)" % ", ".join(_ENCODERS))


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """`[n, H, W, 3]` (or one `[H, W, 3]`) uint8, or float in 0..1 → contiguous uint8 numpy `[n, H, W, 3]`."""
    x = torch.as_tensor(frames).detach()
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames [n, H, W, 3], got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return np.ascontiguousarray(x.cpu().numpy())


class Mp4Writer:
    """Write an mp4 incrementally: `write(frames)` any number of times, then `close()` (or `abort()`).

    audio: an AudioClip (or `(samples [C, T], sample_rate)`) muxed as AAC, cut to exactly the video length.
    metadata: stored as container metadata tags (e.g. seed, prompt), readable with any mp4 tool.
    The container follows the path's suffix (CONTAINERS): .mp4 (default), .mov, .webm (Opus audio), .gif (no audio).
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float = 25, crf: int = 19,
                 pix_fmt: str = "yuv420p", audio: AudioClip | tuple[Any, int] | None = None,
                 metadata: Mapping[str, Any] | None = None, audio_bitrate: int = 192_000,
                 codec: str | None = None):
        self.path = Path(path)
        # fps may be fractional (29.97 -> 2997/100; pass Fraction(30000, 1001) for NTSC exactly);
        # codec None = the best H.264 encoder available, else a PyAV encoder name such as "libx265"
        self.width, self.height, self.fps = int(width), int(height), Fraction(fps).limit_denominator(1001)
        if self.width < 2 or self.height < 2 or (pix_fmt == "yuv420p" and (self.width % 2 or self.height % 2)):
            raise InputError("size", f"video size must be even for {pix_fmt}, got {self.width}×{self.height}")
        self.format, audio_codec = CONTAINERS.get(Path(path).suffix.lower(), ("mp4", "aac"))
        if isinstance(audio, tuple):
            audio = AudioClip(torch.as_tensor(audio[0], dtype=torch.float32), int(audio[1]))
        if audio is not None and audio_codec is None:
            raise InputError("audio", f"a .{self.format} file has no audio track: leave the audio out or choose "
                                      "a video format")
        if audio is not None:
            ready, rate, _ = aac_ready_audio(audio.samples, audio.sample_rate)
            audio = AudioClip(torch.from_numpy(ready), rate)
            if audio_codec == "libopus" and rate != OPUS_RATE:
                audio = AudioClip(resample(audio.samples, rate, OPUS_RATE), OPUS_RATE)
        self.audio = audio
        self.frames_written = 0
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix or '.mp4'}")
        self._file = atomic_write(self.path, partial)
        self.temp_path = self._file.partial   # renamed onto `path` by close(), removed by abort()
        self.codec = codec or pick_video_encoder()
        if self.codec == "libx265" and min(self.width, self.height) < 64:  # smaller frames corrupt libx265's heap
            raise InputError("codec", f"h265 needs a video of at least 64×64 pixels, got {self.width}×{self.height}: "
                                      "use h264")
        flags = {"movflags": "+faststart+use_metadata_tags"} if self.format in ("mp4", "mov") else {}
        self._container = av.open(str(self.temp_path), mode="w", format=self.format, options=flags)
        try:
            for key, value in (metadata or {}).items():
                self._container.metadata[str(key)] = str(value)
            options = {"crf": str(crf), "preset": "medium"} if self.codec in ("libx264", "libx265") else {}
            options.update({k: v.format(crf=crf) for k, v in _ENCODER_OPTIONS.get(self.codec, {}).items()})
            if self.codec == "libx265":
                options["x265-params"] = "log-level=error"
            if self.codec == "libx264" and x264_cpu_flags():
                options["x264-params"] = f"asm={x264_cpu_flags()}"
            self._video = self._container.add_stream(self.codec, rate=self.fps, options=options)
            if self.codec == "libx265":
                self._video.codec_tag = "hvc1"  # the HEVC tag Apple players require in mp4
            self._video.width, self._video.height = self.width, self.height
            self._video.pix_fmt = pix_fmt
            if self.codec == "mpeg4":
                self._video.bit_rate = 8_000_000
            self._tag_bt709 = pix_fmt.startswith("yuv")
            if self._tag_bt709:   # convert and tag as BT.709 limited range: what players assume for HD video
                cc = self._video.codec_context
                cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range = 1, 1, 1, 1
            self._audio = None
            if audio is not None:
                rate, layout = aac_output_format(audio.sample_rate, audio.channels)
                rate = OPUS_RATE if audio_codec == "libopus" else rate
                self._audio = self._container.add_stream(audio_codec, rate=rate, layout=layout)
                self._audio.bit_rate = audio_bitrate
        except Exception:
            self.abort()
            raise

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append frames `[n, H, W, 3]` (uint8, or float 0..1) of this writer's size."""
        if self._closed:
            raise RuntimeError("writer is closed")
        arr = to_uint8_frames(frames)
        if arr.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frames are {arr.shape[2]}×{arr.shape[1]}, the video is {self.width}×{self.height}")
        try:
            self._write_frames(arr)
        except OSError as exc:
            if is_out_of_space(exc):
                self.abort()
                raise OutOfSpace(self.path.parent, self.path.name) from None
            raise

    def _write_frames(self, arr: np.ndarray) -> None:
        for img in arr:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if self._tag_bt709:
                frame = frame.reformat(format=self._video.pix_fmt, dst_colorspace="itu709", dst_color_range="MPEG")
            frame.pts = self.frames_written
            frame.time_base = Fraction(1, self.fps)
            for packet in self._video.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1

    @property
    def duration(self) -> float:
        """Seconds of video written so far."""
        return self.frames_written / self.fps

    def _encode_audio(self) -> None:
        clip = self.audio
        n = int(round(self.frames_written * clip.sample_rate / self.fps))
        x = clip.samples.to(torch.float32)[:, :n]
        if x.shape[1] < n:
            x = torch.nn.functional.pad(x, (0, n - x.shape[1]))
        x = np.ascontiguousarray(x.clamp(-1, 1).numpy())
        stream = self._audio
        step = stream.codec_context.frame_size or 1024
        layout = "mono" if x.shape[0] == 1 else "stereo"
        for pos in range(0, n, step):
            piece = np.ascontiguousarray(x[:, pos:pos + step])
            frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=layout)
            frame.sample_rate = clip.sample_rate
            frame.pts = pos
            frame.time_base = Fraction(1, clip.sample_rate)
            for packet in stream.encode(frame):
                self._container.mux(packet)
        for packet in stream.encode(None):
            self._container.mux(packet)

    def close(self) -> Path:
        """Flush video, encode the audio, finish the file and move it onto the output name."""
        if self._closed:
            return self.path
        try:
            if self.frames_written == 0:
                raise RuntimeError("no frames were written")
            for packet in self._video.encode(None):
                self._container.mux(packet)
            if self._audio is not None:
                self._encode_audio()
            self._container.close()
            self._closed = True
            self._file.commit()
        except BaseException as exc:
            self.abort()
            if is_out_of_space(exc):
                raise OutOfSpace(self.path.parent, self.path.name) from None
            raise
        return self.path

    def abort(self) -> None:
        """Stop and delete the temp file; the output name is left untouched."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away
                pass
        self._file.discard()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
