"""Input budgets, checked from file headers before anything is decoded.

Every media input (image, video, mask, audio) passes through one of the `probe_*` functions here before
any decoding or model work: at API submit time, in the CLI and in the nodes. They read only headers (a
few kB at most, bounded time and memory), so a decompression bomb — a 300 kB PNG of 16000×16000 pixels,
a 28 kB FLAC of 384 kHz silence — is refused in milliseconds with an InputError that names the input
field, the value found and the limit. The decoders (`audio.io.load_audio`, `video.reader`) enforce the
same limits again while decoding, since headers can lie.

The limits are documented in docs/media.md; change them here only.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, require_file
from .pipeline.windows import MAX_SECONDS

__all__ = [
    "MAX_PIXELS", "MAX_SIDE", "MIN_SIDE", "MAX_SAMPLE_RATE", "MIN_SAMPLE_RATE", "MAX_AUDIO_CHANNELS",
    "MAX_AUDIO_VALUES", "MIN_AUDIO_SECONDS", "MAX_AUDIO_SECONDS", "MAX_VIDEO_SECONDS", "EMPTY_MASK",
    "ImageInfo", "AudioInfo", "VideoInfo",
    "image_size_from_header", "probe_image", "probe_audio", "probe_video", "check_mask",
    "check_pixels", "check_audio_format",
]

# -- the limits ------------------------------------------------------------------------------------------
MAX_PIXELS = 40_000_000          # pixels of one image / video frame (40 MP: e.g. 8000×5000); RGB ≈ 120 MB
MAX_SIDE = 16384                 # longest side of an image / frame in pixels
MIN_SIDE = 32                    # smaller pictures cannot make a useful video (latents are 1/8 of the pixels)
MAX_SAMPLE_RATE = 192_000        # Hz; higher-rate audio is refused (everything is resampled to ≤ 48 kHz anyway)
MIN_SAMPLE_RATE = 4_000          # Hz; below this there is no speech to hear
MAX_AUDIO_CHANNELS = 32          # channels of one audio stream (any count up to this decodes; mixed down later)
MAX_AUDIO_VALUES = 64_000_000    # decoded samples × channels of one audio input (256 MB as float32);
#                                  e.g. 10 min of 48 kHz stereo = 57.6 M fits, 10 min of 96 kHz stereo does not
MIN_AUDIO_SECONDS = 0.1          # 2.5 video frames: shorter clips hold no speech to lip-sync (and used to fail late)
MAX_AUDIO_SECONDS = float(MAX_SECONDS)  # 10 minutes: the longest audio a job accepts (pipeline.windows)
MAX_VIDEO_SECONDS = 3600.0       # a reference video may be longer than the audio (only the start is read)

EMPTY_MASK = ("the mask is empty (all black or fully transparent): nothing would move; paint the regions that "
              "may move white (or opaque)")


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of an image (or of a video's first frame)."""

    width: int
    height: int
    format: str                  # "png", "jpeg", "webp", "gif", "bmp", or the FFmpeg codec name


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio input (or a video's audio track). `seconds` may be an estimate, and is NaN
    when the headers do not say (the decoder then enforces the limits as it goes)."""

    sample_rate: int
    channels: int
    seconds: float


@dataclass(frozen=True)
class VideoInfo:
    """Header facts of a video input: frame size, duration, and its audio track's facts if it has one."""

    width: int
    height: int
    seconds: float
    audio: AudioInfo | None


# -- checks on already-known facts (used by probes and by decoders) ----------------------------------------
def check_pixels(width: int, height: int, field: str) -> None:
    """InputError(field) unless MIN_SIDE ≤ each side ≤ MAX_SIDE and width·height ≤ MAX_PIXELS."""
    w, h = int(width), int(height)
    if w > MAX_SIDE or h > MAX_SIDE:
        raise InputError(field, f"the picture is {w}×{h} pixels; each side may be at most {MAX_SIDE} (MAX_SIDE)")
    if w * h > MAX_PIXELS:
        raise InputError(field, f"the picture is {w}×{h} = {w * h / 1e6:.1f} megapixels; at most "
                                f"{MAX_PIXELS / 1e6:.0f} megapixels (MAX_PIXELS) are accepted")
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InputError(field, f"the image is {w}×{h} pixels; each side must be at least {MIN_SIDE}")


def check_audio_format(sample_rate: int, channels: int, seconds: float | None, field: str) -> None:
    """InputError(field) for a sample rate outside [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE], a channel count
    outside [1, MAX_AUDIO_CHANNELS], or (when `seconds` is known) audio shorter than MIN_AUDIO_SECONDS,
    longer than MAX_AUDIO_SECONDS, or holding more than MAX_AUDIO_VALUES samples × channels."""
    rate, ch = int(sample_rate), int(channels)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InputError(field, f"the audio's sample rate is {rate} Hz; accepted are {MIN_SAMPLE_RATE} to "
                                f"{MAX_SAMPLE_RATE} Hz (MAX_SAMPLE_RATE); resample it, e.g. to 48000 Hz")
    if not 1 <= ch <= MAX_AUDIO_CHANNELS:
        raise InputError(field, f"the audio has {ch} channels; 1 to {MAX_AUDIO_CHANNELS} (MAX_AUDIO_CHANNELS) "
                                f"are accepted")
    if seconds is None:
        return
    if seconds < MIN_AUDIO_SECONDS:
        raise InputError(field, f"the audio is {seconds * 1000:.0f} ms long; at least "
                                f"{MIN_AUDIO_SECONDS * 1000:.0f} ms (MIN_AUDIO_SECONDS) is needed")
    if seconds > MAX_AUDIO_SECONDS + 1.0:
        raise InputError(field, f"the audio is {seconds:.1f} s long; at most {MAX_AUDIO_SECONDS:.0f} s "
                                f"({MAX_AUDIO_SECONDS / 60:.0f} minutes, MAX_AUDIO_SECONDS) is supported")
    values = seconds * rate * ch
    if values > MAX_AUDIO_VALUES:
        raise InputError(field, f"the audio decodes to {values / 1e6:.0f} million samples ({seconds:.1f} s × "
                                f"{rate} Hz × {ch} channels); at most {MAX_AUDIO_VALUES / 1e6:.0f} million "
                                f"(MAX_AUDIO_VALUES): use a lower sample rate or fewer channels")


# -- header-only probes --------------------------------------------------------------------------------
_HEADER_BYTES = 1 << 20      # how far into a JPEG we look for its frame header


def _jpeg_size(f) -> tuple[int, int] | None:
    """(w, h) from the first SOFn segment of a JPEG, walking segment lengths (bounded by _HEADER_BYTES)."""
    f.seek(2)
    while f.tell() < _HEADER_BYTES:
        b = f.read(1)
        if not b:
            return None
        if b != b"\xff":
            continue
        marker = f.read(1)
        while marker == b"\xff":
            marker = f.read(1)
        if not marker:
            return None
        m = marker[0]
        if m in (0x01, 0xD8) or 0xD0 <= m <= 0xD7:       # markers without a length
            continue
        raw = f.read(2)
        if len(raw) < 2:
            return None
        (length,) = struct.unpack(">H", raw)
        if length < 2:                                     # corrupt: a length counts its own two bytes
            return None
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            seg = f.read(5)
            if len(seg) < 5:
                return None
            h, w = struct.unpack(">HH", seg[1:5])
            return w, h
        f.seek(length - 2, 1)
    return None


def image_size_from_header(path: str | os.PathLike) -> ImageInfo | None:
    """Width and height of a PNG, JPEG, WebP, GIF or BMP from its first bytes (no decoding, ≤ 1 MB read);
    None when the file is none of these (callers then ask FFmpeg's demuxer with a pixel cap)."""
    with open(path, "rb") as f:
        head = f.read(32)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            w, h = struct.unpack(">II", head[16:24])
            return ImageInfo(w, h, "png")
        if head[:3] == b"\xff\xd8\xff":
            size = _jpeg_size(f)
            return None if size is None else ImageInfo(size[0], size[1], "jpeg")
        if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
            w, h = struct.unpack("<HH", head[6:10])
            return ImageInfo(w, h, "gif")
        if head[:2] == b"BM" and len(head) >= 26:
            if struct.unpack("<I", head[14:18])[0] == 12:    # OS/2 BITMAPCOREHEADER: 16-bit sides
                w, h = struct.unpack("<HH", head[18:22])
            else:                                             # BITMAPINFOHEADER and later: signed 32-bit
                w, h = struct.unpack("<ii", head[18:26])
            return ImageInfo(abs(w), abs(h), "bmp")
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            kind = head[12:16]
            if kind == b"VP8X" and len(head) >= 30:
                w = 1 + int.from_bytes(head[24:27], "little")
                h = 1 + int.from_bytes(head[27:30], "little")
                return ImageInfo(w, h, "webp")
            if kind == b"VP8L" and len(head) >= 25:
                bits = int.from_bytes(head[21:25], "little")
                return ImageInfo(1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF), "webp")
            if kind == b"VP8 ":
                f.seek(26)
                raw = f.read(4)
                if len(raw) == 4:
                    w, h = struct.unpack("<HH", raw)
                    return ImageInfo(w & 0x3FFF, h & 0x3FFF, "webp")
    return None


def _open_capped(path: Path, field: str, what: str):
    """av.open with decoders refusing frames over MAX_PIXELS, so stream probing cannot allocate more."""
    import av

    try:
        return av.open(str(path), mode="r", options={"max_pixels": str(MAX_PIXELS)})
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(field, f"cannot read {path} as {what} ({exc})") from None


def _video_size(stream, path: Path, field: str) -> tuple[int, int]:
    w, h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if w <= 0 or h <= 0:     # the capped decoder refused the frame during probing: too large (or corrupt)
        raise InputError(field, f"cannot read the picture size of {path}: it is corrupt or larger than "
                                f"{MAX_PIXELS / 1e6:.0f} megapixels (MAX_PIXELS)")
    return w, h


def probe_image(path: str | os.PathLike, field: str = "image") -> ImageInfo:
    """Check an image input before decoding: it exists, is non-empty, and its header size is within
    MIN_SIDE / MAX_SIDE / MAX_PIXELS. Returns its ImageInfo; InputError(field) otherwise."""
    p = require_file(path, field)
    info = image_size_from_header(p)
    if info is None:
        with _open_capped(p, field, "an image") as container:
            if not container.streams.video:
                raise InputError(field, f"{p} contains no image")
            stream = container.streams.video[0]
            w, h = _video_size(stream, p, field)
            info = ImageInfo(w, h, stream.codec_context.name)
    check_pixels(info.width, info.height, field)
    return info


def _stream_seconds(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1e6
    return None


def _audio_info(container, stream, field: str, check: bool = True) -> AudioInfo:
    rate = int(stream.codec_context.sample_rate or stream.sample_rate or 0)
    channels = int(stream.codec_context.channels or 0)
    seconds = _stream_seconds(container, stream)
    if check:
        check_audio_format(rate, channels, seconds, field)
    return AudioInfo(rate, channels, seconds if seconds is not None else float("nan"))


def probe_audio(path: str | os.PathLike, field: str = "left_audio") -> AudioInfo:
    """Check an audio input (or a video's audio track) from its container/stream headers: sample rate,
    channel count, duration and decoded size within the limits above. InputError(field) otherwise.
    Nothing is decoded; time and memory are bounded whatever the file claims."""
    p = require_file(path, field)
    with _open_capped(p, field, "audio or video") as container:
        if not container.streams.audio:
            raise InputError(field, f"{p} has no audio track")
        return _audio_info(container, container.streams.audio[0], field)


def probe_video(path: str | os.PathLike, field: str = "video") -> VideoInfo:
    """Check a video input from its headers: frame size within the pixel limits and duration ≤
    MAX_VIDEO_SECONDS. InputError(field) otherwise. Its audio track's facts are reported, not checked:
    the track is checked (`probe_audio`) only where it is used as a speaker's audio."""
    p = require_file(path, field)
    with _open_capped(p, field, "a video") as container:
        if not container.streams.video:
            raise InputError(field, f"{p} has no video track")
        stream = container.streams.video[0]
        w, h = _video_size(stream, p, field)
        check_pixels(w, h, field)
        seconds = _stream_seconds(container, stream)
        if seconds is not None and seconds > MAX_VIDEO_SECONDS:
            raise InputError(field, f"the video is {seconds:.0f} s long; at most {MAX_VIDEO_SECONDS:.0f} s "
                                    f"(MAX_VIDEO_SECONDS) is accepted")
        audio = _audio_info(container, container.streams.audio[0], field, check=False) if container.streams.audio else None
    return VideoInfo(w, h, seconds if seconds is not None else float("nan"), audio)


_MASK_STRIP_PIXELS = 1 << 20   # mask pixels thresholded at a time: the float copy stays ~12 MB at any size


def check_mask(path: str | os.PathLike, field: str = "mask_image") -> None:
    """Refuse a mask image that marks nothing (all black / fully transparent): the job would "succeed" with
    nothing moving. Probed first (so decoding stays within MAX_PIXELS), then one frame is decoded and
    thresholded strip by strip with the pipeline's rule (`masks.mask_from_array`), so a 40 MP mask is never
    held as float. A mask marking everything is valid (everything is generated). InputError(field, EMPTY_MASK)."""
    from .pipeline.masks import mask_from_array
    from .video.reader import load_image_with_alpha

    rgb, alpha = load_image_with_alpha(path, field)    # alpha only when not fully opaque: it then marks the region
    plane = rgb if alpha is None else alpha
    del rgb, alpha                                     # only the plane that decides stays in memory
    height, width = int(plane.shape[0]), int(plane.shape[1])
    step = max(2, _MASK_STRIP_PIXELS // width)
    top = 0
    while top < height:
        end = height if height - top < 2 * step else top + step    # the last strip takes the rest (never 1 row)
        strip = plane[top:end]
        if bool(mask_from_array(strip, end - top, width, field).any()):
            return
        top = end
    raise InputError(field, EMPTY_MASK)
