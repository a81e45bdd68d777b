"""Image and video input via PyAV: still images, and any video read as 25-fps frames by timestamp.

`VideoSource.frame_at(i)` is the source frame on screen at time i/25 s (the last frame whose timestamp is
≤ i/25 after the first frame), so a 30-fps or 24-fps source keeps its real timing. Decoding is forward-only
with seeks for far jumps; nothing holds the whole video. Past the end, the source is extended by ping-pong
(…, n−2, n−1, n−2, …, 0, 1, …) or, with `extend="hold"`, by repeating the last frame.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

from ..audio.io import AudioClip, AudioInfo, audio_info, load_audio, open_capped, stream_seconds
from ..errors import InputError, require_file, unreadable_reason
from ..limits import FPS, MAX_PIXELS, MAX_VIDEO_SECONDS, MIN_SIDE, check_pixels

__all__ = ["ImageInfo", "VideoInfo", "image_size_from_header", "probe_image", "probe_video", "load_image", "load_image_with_alpha", "VideoSource"]

_SEEK_AHEAD = Fraction(2)  # seconds: jumps further ahead than this seek instead of decoding through


# -- header probes: the limits checked before anything is decoded ------------------------------------
@dataclass(frozen=True)
class ImageInfo:
    """Header facts of an image (or of a video's first frame)."""

    width: int
    height: int
    format: str                  # "png", "jpeg", "webp", "gif", "bmp", or the FFmpeg codec name


@dataclass(frozen=True)
class VideoInfo:
    """Header facts of a video input: frame size, duration, and its audio track's facts if it has one."""

    width: int
    height: int
    seconds: float
    audio: AudioInfo | None


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
        with open_capped(p, field, "an image") as container:
            if not container.streams.video:
                raise InputError(field, f"{p} contains no image")
            stream = container.streams.video[0]
            w, h = _video_size(stream, p, field)
            info = ImageInfo(w, h, stream.codec_context.name)
    check_pixels(info.width, info.height, field)
    return info


def probe_video(path: str | os.PathLike, field: str = "video") -> VideoInfo:
    """Check a video input from its headers: frame size within the pixel limits and duration ≤
    MAX_VIDEO_SECONDS. InputError(field) otherwise. Its audio track's facts are reported, not checked:
    the track is checked (`probe_audio`) only where it is used as a speaker's audio."""
    p = require_file(path, field)
    with open_capped(p, field, "a video") as container:
        if not container.streams.video:
            raise InputError(field, f"{p} has no video track")
        stream = container.streams.video[0]
        w, h = _video_size(stream, p, field)
        check_pixels(w, h, field)
        seconds = stream_seconds(container, stream)
        if seconds is not None and seconds > MAX_VIDEO_SECONDS:
            raise InputError(field, f"the video is {seconds:.0f} s long; at most {MAX_VIDEO_SECONDS:.0f} s "
                                    f"(MAX_VIDEO_SECONDS) is accepted")
        audio = audio_info(container, container.streams.audio[0], field, check=False) if container.streams.audio else None
    return VideoInfo(w, h, seconds if seconds is not None else float("nan"), audio)


def _open(path: str | os.PathLike, name: str):
    """Open for decoding with every decoder capped at MAX_PIXELS per frame (FFmpeg's `max_pixels`), so a
    stream whose headers understate its frame size still cannot allocate a larger frame."""
    p = require_file(path, name)
    try:
        container = av.open(str(p), mode="r", options={"max_pixels": str(MAX_PIXELS)})
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(name, f"cannot read {p}: {unreadable_reason(exc, 'an image or video file')}") from None
    for stream in container.streams.video:
        stream.codec_context.options = {"max_pixels": str(MAX_PIXELS)}
    return container


def _check_size(h: int, w: int, name: str) -> None:
    check_pixels(w, h, name)


def load_image_with_alpha(path: str | os.PathLike, name: str = "image") -> tuple[torch.Tensor, torch.Tensor | None]:
    """First frame of an image (png, jpg, webp, bmp, …) or video: uint8 RGB `[H, W, 3]` and, when the image
    has a non-opaque alpha channel, its alpha as uint8 `[H, W]` (else None). Alpha is dropped from the RGB,
    not composited (as PIL's convert('RGB') in the reference). The header is checked against the limits
    (`probe_image`) before anything is decoded."""
    probe_image(path, name)
    with _open(path, name) as container:
        if not container.streams.video:
            raise InputError(name, f"{path} contains no image")
        try:
            frame = next(container.decode(video=0), None)
        except av.FFmpegError as exc:
            raise InputError(name, f"{path} is corrupt, not a supported image, or larger than "
                                   f"{MAX_PIXELS / 1e6:.0f} megapixels (MAX_PIXELS) ({exc})") from None
        if frame is None:
            raise InputError(name, f"{path} contains no decodable image")
        rgb = _upright(frame, frame.to_ndarray(format="rgb24"))
        alpha = _alpha_of(frame)
        alpha = None if alpha is None else _upright(frame, alpha)
    _check_size(rgb.shape[0], rgb.shape[1], name)
    rgb = torch.from_numpy(np.ascontiguousarray(rgb))
    return rgb, (torch.from_numpy(np.ascontiguousarray(alpha)) if alpha is not None and (alpha < 255).any() else None)


def _upright(frame, img: np.ndarray) -> np.ndarray:
    """Apply the stream's display rotation (phone videos, some images) so the picture is shown upright."""
    try:
        turns = int(round((frame.rotation or 0) / 90)) % 4
    except Exception:  # noqa: BLE001 - malformed side data: show the frame as stored
        turns = 0
    return np.rot90(img, k=turns) if turns else img


def _alpha_of(frame) -> np.ndarray | None:
    """uint8 alpha `[H, W]` of a decoded frame, or None if its pixel format has none.

    A planar 8-bit alpha plane (yuva*, e.g. lossy webp) is read directly: FFmpeg's swscale conversion to
    rgba zeroes the last columns' alpha for some widths.
    """
    comps = frame.format.components
    alpha = [c for c in comps if c.is_alpha]
    if not alpha and frame.format.name != "pal8":
        return None
    if alpha and frame.format.is_planar and alpha[0].bits == 8:
        plane = frame.planes[alpha[0].plane]
        buf = np.frombuffer(memoryview(plane), np.uint8)
        return buf.reshape(frame.height, plane.line_size)[:, :frame.width].copy()
    return frame.to_ndarray(format="rgba")[..., 3]


def load_image(path: str | os.PathLike, name: str = "image") -> torch.Tensor:
    """An image file as uint8 RGB `[H, W, 3]` (InputError naming `name` if unreadable or smaller than 32 px)."""
    return load_image_with_alpha(path, name)[0]


class VideoSource:
    """A video (or still image) read as 25-fps frames; open it with `with` or call `close()`.

    extend: "pingpong" (default) or "hold" — what frame indices past the end show.
    """

    def __init__(self, path: str | os.PathLike, name: str = "video", extend: str = "pingpong"):
        if extend not in ("pingpong", "hold"):
            raise InputError("extend", f"expected 'pingpong' or 'hold', got {extend!r}")
        self.path, self.name, self.extend = Path(path), name, extend
        self.info = probe_video(path, name)     # header checks (frame size, duration) before decoding
        self._container = _open(path, name)
        try:
            if not self._container.streams.video:
                raise InputError(name, f"{path} has no video track")
            self._stream = self._container.streams.video[0]
            self._stream.thread_type = "AUTO"
            self._tb = self._stream.time_base or Fraction(1, 1_000_000)
            self._restart(None)
            first = self._pull()
            if first is None:
                raise InputError(name, f"{path} has no frames")
            self.height, self.width = _upright(first[0], np.empty((first[0].height, first[0].width, 0))).shape[:2]
            _check_size(self.height, self.width, name)
            self._t0 = first[1]
            self._next = first
            self.fps = float(self._stream.average_rate or self._stream.guessed_rate or FPS)
            self.duration = self._probe_duration()
            # 25-fps frames that start before the end: ceil, less one clock tick (≤ 1 ms) of timestamp rounding
            slack = min(self._tb, Fraction(1, 1000))
            self.num_frames = max(1, int(-((-(self.duration - slack) * FPS) // 1)))
            self.has_audio = bool(self._container.streams.audio)
        except BaseException:
            self._container.close()
            raise
        self._cache: tuple[int, torch.Tensor] | None = None

    # -- probing / decoding -------------------------------------------------------------------------------
    def _frame_time(self, frame) -> Fraction:
        return Fraction(frame.pts if frame.pts is not None else 0) * self._tb

    def _restart(self, seek_to: Fraction | None) -> None:
        if seek_to is not None:
            try:
                self._container.seek(max(0, int(seek_to / self._tb)), stream=self._stream, backward=True,
                                     any_frame=False)
            except (av.FFmpegError, OSError):          # not seekable: start again from the beginning
                self._container.close()
                self._container = _open(self.path, self.name)
                self._stream = self._container.streams.video[0]
                self._stream.thread_type = "AUTO"
        self._decoder = self._container.decode(self._stream)
        self._cur: tuple | None = None
        self._next: tuple | None = None

    def _pull(self) -> tuple | None:
        try:
            frame = next(self._decoder, None)
        except av.FFmpegError as exc:
            raise InputError(self.name, f"{self.path} is corrupt or its frames exceed {MAX_PIXELS / 1e6:.0f} "
                                        f"megapixels (MAX_PIXELS) ({exc})") from None
        return None if frame is None else (frame, self._frame_time(frame))

    def _probe_duration(self) -> Fraction:
        """Seconds from the first frame to the end of the last (metadata, else a packet scan)."""
        s = self._stream
        if s.duration:
            return max(Fraction(0), Fraction(s.duration) * self._tb - (self._t0 - Fraction(s.start_time or 0) * self._tb))
        last, step = None, Fraction(1, max(1, round(self.fps)))
        with av.open(str(self.path)) as probe:
            for packet in probe.demux(probe.streams.video[0]):
                if packet.pts is not None:
                    t = Fraction(packet.pts) * self._tb
                    last = t if last is None else max(last, t)
        if last is None:
            return step
        return last - self._t0 + step

    def _decode_time(self, t: Fraction):
        """The decoded frame on screen at source time t (relative to the first frame)."""
        target = self._t0 + t
        if self._cur is not None and (target < self._cur[1] or target - self._cur[1] > _SEEK_AHEAD):
            self._restart(target)
        while True:
            if self._next is None:
                self._next = self._pull()
            if self._next is None or self._next[1] > target:
                break
            self._cur, self._next = self._next, None
        if self._cur is None:              # target before the first decodable frame: show that frame
            self._cur, self._next = self._next, None
        if self._cur is None:
            raise InputError(self.name, f"{self.path}: no decodable frame at {float(t):.3f} s")
        return self._cur[0]

    # -- public ------------------------------------------------------------------------------------------
    def source_index(self, i: int) -> int:
        """The in-range 25-fps index shown for output index i (ping-pong or hold past the end)."""
        if i < 0:
            raise IndexError(f"frame index must be >= 0, got {i}")
        n = self.num_frames
        if i < n:
            return i
        if self.extend == "hold" or n == 1:
            return n - 1
        period = 2 * (n - 1)
        j = i % period
        return j if j < n else period - j

    def frame_at(self, i: int) -> torch.Tensor:
        """Output frame i (time i/25 s) as uint8 `[H, W, 3]`."""
        k = self.source_index(i)
        if self._cache is not None and self._cache[0] == k:
            return self._cache[1]
        frame = self._decode_time(Fraction(k, FPS))
        img = torch.from_numpy(np.ascontiguousarray(_upright(frame, frame.to_ndarray(format="rgb24"))))
        self._cache = (k, img)
        return img

    def frames(self, start: int, count: int) -> Iterator[torch.Tensor]:
        """Output frames start … start+count−1, decoded forward; backward (ping-pong) runs are decoded forward
        once and replayed in reverse."""
        idx = [self.source_index(i) for i in range(start, start + count)]
        pos = 0
        while pos < len(idx):
            end = pos + 1
            if end < len(idx) and idx[end] < idx[pos]:
                while end < len(idx) and idx[end] == idx[end - 1] - 1:
                    end += 1
                run = idx[pos:end]
                decoded = {k: self.frame_at(k) for k in sorted(run)}
                yield from (decoded[k] for k in run)
            else:
                yield self.frame_at(idx[pos])
            pos = end

    def audio(self) -> AudioClip:
        """The source's audio track (InputError if it has none)."""
        return load_audio(self.path, self.name)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
