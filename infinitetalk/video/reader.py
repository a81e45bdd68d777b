"""Image and video input via PyAV: still images, and any video read as 25-fps frames by timestamp.

`VideoSource.frame_at(i)` is the source frame on screen at time i/25 s (the last frame whose timestamp is
≤ i/25 after the first frame), so a 30-fps or 24-fps source keeps its real timing. Decoding is forward-only
with seeks for far jumps; nothing holds the whole video. Past the end, the source is extended by ping-pong
(…, n−2, n−1, n−2, …, 0, 1, …) or, with `extend="hold"`, by repeating the last frame.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

from ..audio.io import AudioClip, load_audio
from ..errors import InputError, require_file
from ..limits import MAX_PIXELS, MIN_SIDE, check_pixels, probe_image, probe_video
from ..pipeline.windows import FPS

__all__ = ["MIN_SIDE", "load_image", "load_image_with_alpha", "VideoSource"]

_SEEK_AHEAD = Fraction(2)  # seconds: jumps further ahead than this seek instead of decoding through


def _open(path: str | os.PathLike, name: str):
    """Open for decoding with every decoder capped at MAX_PIXELS per frame (FFmpeg's `max_pixels`), so a
    stream whose headers understate its frame size still cannot allocate a larger frame."""
    p = require_file(path, name)
    try:
        container = av.open(str(p), mode="r", options={"max_pixels": str(MAX_PIXELS)})
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(name, f"cannot read {p} as an image or video ({exc})") from None
    for stream in container.streams.video:
        stream.codec_context.options = {"max_pixels": str(MAX_PIXELS)}
    return container


def _check_size(h: int, w: int, name: str) -> None:
    check_pixels(w, h, name)


def load_image_with_alpha(path: str | os.PathLike, name: str = "image") -> tuple[torch.Tensor, torch.Tensor | None]:
    """First frame of an image (png, jpg, webp, bmp, …) or video: uint8 RGB `[H, W, 3]` and, when the image
    has a non-opaque alpha channel, its alpha as uint8 `[H, W]` (else None). Alpha is dropped from the RGB,
    not composited (as PIL's convert('RGB') in the reference). The header is checked against the limits
    (`limits.probe_image`) before anything is decoded."""
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
