"""Per-window video segments joined into the final mp4 without re-encoding.

Each finished window is encoded on its own (h264, starts with a key frame) into the job folder, so a
crashed job resumes with the exact bitstream of the windows already done. At the end the segments' video
packets are copied back to back (time stamps shifted) into one file, the audio is encoded (aac) beside
them, and the file is renamed to its final name only when complete.
"""
from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import disk_full_as_out_of_space
from ..files import atomic_write
from .writer import aac_ready_audio

__all__ = ["concat_segments", "remux"]

FPS = 25
CONTAINER_TAGS = ("major_brand", "minor_version", "compatible_brands", "encoder")   # the muxer writes its own


def _layout(channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


def _audio_frames(samples: np.ndarray, sample_rate: int, frame_size: int):
    """fltp AudioFrames of `frame_size` samples with running pts (the last one shorter)."""
    layout = _layout(samples.shape[0])
    for i in range(0, samples.shape[1], frame_size):
        chunk = np.ascontiguousarray(samples[:, i:i + frame_size], dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = i
        frame.time_base = Fraction(1, sample_rate)
        yield frame


def concat_segments(
    segments: Sequence[Path],
    out: Path,
    frames: int,
    audio: tuple[np.ndarray, int] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Join h264 `segments` (same size/settings) into `out` with `audio` = (samples [C, T] float, rate).

    The audio is cut (or zero padded) to exactly `frames`/25 s, mixed down / resampled as `aac_ready_audio`.
    Written under a partial name and renamed to `out` at the end; on any error the partial file is removed
    and `out` is untouched (a full disk is an OutOfSpace naming the folder).
    """
    out = Path(out)
    with disk_full_as_out_of_space(out.parent, out.name), atomic_write(out) as part:
        part.unlink(missing_ok=True)   # left by an interrupted run
        _write(segments, part, frames, audio, metadata or {})
    return out


def remux(src: Path, out: Path, metadata: dict[str, str]) -> Path:
    """Copy `src`'s video and audio packets into `out` (no re-encode) with `metadata` added to its own tags
    (e.g. the ComfyUI graph that made it); atomic like `concat_segments`."""
    out = Path(out)
    with disk_full_as_out_of_space(out.parent, out.name), atomic_write(out) as tmp:
        tmp.unlink(missing_ok=True)   # left by an interrupted run
        with av.open(str(src)) as source, av.open(str(tmp), "w", format="mp4",
                                                  options={"movflags": "+faststart+use_metadata_tags"}) as container:
            kept = {k: v for k, v in source.metadata.items() if k not in CONTAINER_TAGS}   # e.g. the job's settings
            for key, value in {**kept, **metadata}.items():
                container.metadata[key] = str(value)
            streams = [s for s in source.streams if s.type in ("video", "audio")]
            copies = {s.index: container.add_stream_from_template(s) for s in streams}
            for packet in source.demux(streams):
                if packet.dts is None:   # the demuxer's end-of-stream marker
                    continue
                packet.stream = copies[packet.stream.index]
                container.mux(packet)
    return out


def _write(segments, tmp: Path, frames: int, audio, metadata: dict[str, str]) -> None:
    with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart+use_metadata_tags"}) as container:
        for key, value in metadata.items():
            container.metadata[key] = str(value)
        with av.open(str(segments[0])) as first:
            vstream = container.add_stream_from_template(first.streams.video[0])
        astream = None
        pending = iter(())
        if audio is not None:
            samples, rate, layout = aac_ready_audio(*audio)   # ≤ 2 channels at a rate AAC has
            n = frames * int(rate) // FPS
            samples = samples[:, :n]
            if samples.shape[1] < n:
                samples = np.pad(samples, ((0, 0), (0, n - samples.shape[1])))
            astream = container.add_stream("aac", rate=int(rate), layout=layout)
            frame_size = astream.codec_context.frame_size or 1024
            pending = _audio_frames(samples, int(rate), frame_size)
        audio_time = 0.0
        offset = 0  # in the video stream's time base

        def feed_audio(until: float) -> float:
            """Encode audio up to `until` seconds so the muxer can interleave without buffering it all."""
            t = audio_time
            while t < until:
                frame = next(pending, None)
                if frame is None:
                    return float("inf")
                container.mux(astream.encode(frame))
                t = (frame.pts + frame.samples) / frame.sample_rate
            return t

        for path in segments:
            with av.open(str(path)) as seg:
                src = seg.streams.video[0]
                scale = src.time_base / vstream.time_base if src.time_base != vstream.time_base else 1
                count = 0
                for packet in seg.demux(src):
                    if packet.dts is None:
                        continue
                    packet.pts = int((packet.pts or 0) * scale) + offset
                    packet.dts = int(packet.dts * scale) + offset
                    packet.stream = vstream
                    if astream is not None:
                        audio_time = feed_audio(float(packet.pts * vstream.time_base))
                    container.mux(packet)
                    count += 1
                offset += int(round(count / FPS / vstream.time_base))
        if astream is not None:
            feed_audio(float("inf"))
            container.mux(astream.encode(None))
