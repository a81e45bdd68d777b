"""INFINITETALK_VIDEO: a finished mp4 on disk plus what downstream nodes need to know about it.

It stands for the video without holding its frames; it also answers the duck-typed parts of core's
VIDEO (`get_stream_source`, `get_components`, `save_to`, `get_dimensions`) for code that expects one.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from . import media


@dataclass(frozen=True)
class InfiniteTalkVideo:
    path: Path
    frames: int
    fps: float
    width: int
    height: int
    seconds: float
    has_audio: bool
    seed: int = -1

    @classmethod
    def from_file(cls, path: Path, seed: int = -1) -> "InfiniteTalkVideo":
        """Probe an mp4 (frame count, size, fps, audio) without decoding its frames."""
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.base_rate or 25)
            frames = int(stream.frames) or sum(1 for _ in container.demux(stream) if _.size)
            has_audio = bool(container.streams.audio)
            width, height = stream.codec_context.width, stream.codec_context.height
        return cls(Path(path), frames, fps, width, height, frames / fps, has_audio, seed)

    def iter_frames(self, chunk: int = 16) -> Iterator[np.ndarray]:
        """uint8 [n,H,W,3] chunks of the decoded video, in order (bounded memory)."""
        import av

        with av.open(str(self.path)) as container:
            buf = []
            for frame in container.decode(video=0):
                buf.append(frame.to_ndarray(format="rgb24"))
                if len(buf) == chunk:
                    yield np.stack(buf)
                    buf = []
            if buf:
                yield np.stack(buf)

    def audio(self) -> dict | None:
        """The video's audio track as AUDIO, or silence of the video's length when it has none."""
        if self.has_audio:
            from infinitetalk.audio.io import load_audio

            clip = load_audio(self.path, "video", max_seconds=self.seconds + 10.0)  # aac padding may exceed the cap
            return media.audio_from_clip(clip.samples, clip.sample_rate)
        return media.audio_from_clip(np.zeros((1, max(1, round(self.seconds * 16000))), np.float32), 16000)

    # -- core VIDEO duck typing ---------------------------------------------------------------------
    def get_stream_source(self) -> str:
        return str(self.path)

    def get_dimensions(self) -> tuple[int, int]:
        return self.width, self.height

    def get_components(self) -> SimpleNamespace:
        images = torch.cat([torch.from_numpy(c).float().div_(255.0) for c in self.iter_frames()])
        return SimpleNamespace(images=images, audio=self.audio(), frame_rate=Fraction(self.fps).limit_denominator(1001))

    def save_to(self, path: str, *args, **kwargs) -> None:
        shutil.copyfile(self.path, path)
