"""Long-video loop arithmetic: which audio frames each 81-frame chunk sees, and what is kept.

Reproduces the reference streaming loop (`wan/multitalk.py::generate_infinitetalk`, golden §3.8/§3.9):
chunk 0 covers frames [0, 81); every next chunk starts 72 frames later (81 − 9 motion frames) and its first
9 frames re-generate the previous chunk's last 9 (they are dropped). The chunk whose window end reaches
min(max_frames, audio frames) is the last; if it runs past the audio its embedding is extended by mirror
padding. The video is trimmed to max_frames and to the audio length.

Short audio (fewer frames than one chunk, which the reference rejects): we generate ONE chunk [0, 81) whose
audio is mirror-padded (then edge-clamped) past the end, and trim the output to the audio length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..limits import FPS

__all__ = [
    "FRAME_NUM", "MOTION_FRAMES", "AUDIO_WINDOW", "MIRROR_EXTRA_ROWS",
    "ChunkPlan", "plan_chunks", "check_chunk_sizes", "gather_audio_window", "gather_audio_windows", "mirror_pad_rows",
    "frames_for_samples", "frames_for_seconds",
]

FRAME_NUM = 81                # frames per chunk (4n+1; 21 latent frames)
MOTION_FRAMES = 9             # frames carried into the next chunk (3 latent frames)
AUDIO_WINDOW = 5              # audio rows per video frame: offsets −2..+2
MIRROR_EXTRA_ROWS = 3         # the reference pads `end − N + 3` rows at the audio end


def frames_for_samples(num_samples: int, sample_rate: int) -> int:
    """Video frames covered by `num_samples` audio samples: floor(samples·25/sr), exact integer arithmetic."""
    return (int(num_samples) * FPS) // int(sample_rate)


def frames_for_seconds(seconds: float) -> int:
    """Video frames in `seconds` of audio (floor of seconds·25, robust to float noise like 3.2·25)."""
    return int(seconds * FPS + 1e-9)


@dataclass(frozen=True)
class ChunkPlan:
    """Windows of the long-video loop and the frame bookkeeping around them.

    windows: per chunk the half-open audio/video frame range [start, end) it is conditioned on.
    generated_frames: frames kept from all chunks before trimming (= end of the last window).
    final_frames: frames of the returned video.
    padded: whether the last window reaches the audio end (its audio is mirror padded).
    """

    windows: list[tuple[int, int]]
    generated_frames: int
    final_frames: int
    padded: bool
    audio_frames: int
    frame_num: int = FRAME_NUM
    motion_frames: int = MOTION_FRAMES

    @property
    def num_chunks(self) -> int:
        return len(self.windows)

    def kept_range(self, k: int) -> tuple[int, int]:
        """Local frame range [lo, hi) of chunk k's decoded frames that go into the final video (may be empty).

        Chunk 0 contributes from frame 0, later chunks from frame `motion_frames`; everything at or past
        `final_frames` in the output timeline is cut.
        """
        start, _ = self.windows[k]
        lo = 0 if k == 0 else self.motion_frames
        hi = max(lo, min(self.frame_num, self.final_frames - start))
        return lo, hi

    def to_json(self) -> dict:
        """The golden-case form (lists, not tuples)."""
        return {
            "windows": [[s, e] for s, e in self.windows],
            "generated_frames": self.generated_frames,
            "final_frames": self.final_frames,
            "padded": self.padded,
        }


def check_chunk_sizes(frame_num: int, motion_frames: int) -> None:
    """The model's constraints: 4n+1 frames per chunk and 4n+1 motion frames (whole latent frames)."""
    if frame_num < 5 or (frame_num - 1) % 4:
        raise InputError("frame_num", f"expected 4n+1 frames per chunk (e.g. 81), got {frame_num}")
    if motion_frames < 1 or (motion_frames - 1) % 4 or motion_frames >= frame_num:
        raise InputError("motion_frames", f"expected 4n+1 motion frames smaller than frame_num {frame_num} (e.g. 9), "
                                          f"got {motion_frames}")


def plan_chunks(audio_frames: int, frame_num: int = FRAME_NUM, motion_frames: int = MOTION_FRAMES,
                max_frames: int | None = None) -> ChunkPlan:
    """Plan the chunks for `audio_frames` frames of audio (25 fps), like the reference loop.

    max_frames: cap on output frames (None = no cap besides the audio). max_frames ≤ frame_num is the
    reference's "clip mode": exactly one chunk, output cut to max_frames (and to the audio).
    Only the arithmetic is checked here; `check_chunk_sizes` checks what the model needs (4n+1).
    """
    n = int(audio_frames)
    if n < 1:
        raise InputError("audio", f"expected at least 1 video frame of audio (1/{FPS} s), got {n} frames")
    if max_frames is not None and int(max_frames) < 1:
        raise InputError("max_frames", f"expected a positive frame count or no limit, got {max_frames}")
    if frame_num < 1 or not 0 <= motion_frames < frame_num:
        raise InputError("motion_frames", f"expected 0 <= motion_frames < frame_num ({frame_num}), got {motion_frames}")
    cap = n if max_frames is None else int(max_frames)   # the reference compares against min(max_frames, N)
    stride = frame_num - motion_frames

    windows = [(0, frame_num)]
    padded = False
    if n <= frame_num:
        # Short audio (reference asserts N > frame_num): one chunk, audio mirror padded past its end.
        padded = True
    elif cap > frame_num:
        start = 0
        while True:
            start += stride
            end = start + frame_num
            windows.append((start, end))
            if end >= min(cap, n):
                padded = end >= n
                break
    generated = frame_num + (len(windows) - 1) * stride
    final = min(generated, cap, n)
    return ChunkPlan(windows=windows, generated_frames=generated, final_frames=final, padded=padded,
                     audio_frames=n, frame_num=frame_num, motion_frames=motion_frames)


def mirror_pad_rows(audio_frames: int, start: int, frame_num: int = FRAME_NUM) -> int:
    """Rows the reference appends (time-reversed tail) before the chunk at `start`; 0 when it ends inside the audio."""
    end = start + frame_num
    return end - audio_frames + MIRROR_EXTRA_ROWS if end >= audio_frames else 0


def gather_audio_window(embeddings: torch.Tensor, start: int, frame_num: int = FRAME_NUM,
                        window: int = AUDIO_WINDOW) -> tuple[torch.Tensor, int]:
    """Per-frame audio context of the chunk starting at `start`: `[frame_num, window, *rest]` and the pad rows.

    Row i, offset o is E[clamp(start + i + o − window//2, 0, len(E) − 1)], where E = embeddings `[N, ...]`,
    mirror-extended by `m = start + frame_num − N + 3` time-reversed tail rows when the chunk reaches the
    audio end (all of them if m > N). Pure gather: bit exact.
    """
    n = embeddings.shape[0]
    if n < 1:
        raise InputError("audio", "the audio embedding has no frames")
    m = mirror_pad_rows(n, start, frame_num)
    table = embeddings
    if m > 0:
        table = torch.cat([embeddings, torch.flip(embeddings[max(n - m, 0):], dims=[0])], dim=0)
    offsets = torch.arange(window, device=embeddings.device) - window // 2
    rows = torch.arange(start, start + frame_num, device=embeddings.device)[:, None] + offsets[None, :]
    rows = rows.clamp(0, table.shape[0] - 1)
    return table[rows], m


def gather_audio_windows(embeddings: list[torch.Tensor], start: int, frame_num: int = FRAME_NUM,
                         window: int = AUDIO_WINDOW) -> torch.Tensor:
    """`gather_audio_window` for each speaker, stacked: `[speakers, frame_num, window, *rest]`."""
    return torch.stack([gather_audio_window(e, start, frame_num, window)[0] for e in embeddings])
