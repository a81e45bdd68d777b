"""Speaker placement: who speaks when, as per-speaker 16 kHz feature tracks plus the mix to put in the mp4.

Orders (the reference's `para` = meanwhile, `add` = left_right; right_left is its mirror):
* meanwhile  — both start at 0; the shorter is padded with silence; the mix is their sum.
* left_right — left speaks, then right; each speaker's track is silent while the other speaks.
* right_left — right speaks, then left.

Length: with S mix samples at the mix rate R, the video has N = floor(S·25/R) frames; the mix is trimmed
to exactly N/25 s (round(N·R/25) samples) and every feature track to N·640 samples at 16 kHz, so the
wav2vec features have exactly N rows and audio and video durations agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..limits import FPS, MAX_FRAMES, MAX_SECONDS
from .io import FEATURE_RATE, AudioClip, resample, to_mono

__all__ = ["ORDERS", "Placement", "place_speakers", "placed_seconds"]

ORDERS = ("meanwhile", "left_right", "right_left")


def placed_seconds(order: str, left_seconds: float, right_seconds: float) -> float:
    """Length of the placed audio (= the video) for a speaking order: the longer track for `meanwhile`, else
    one after the other (before the exact trim to whole frames)."""
    return max(left_seconds, right_seconds) if order == "meanwhile" else left_seconds + right_seconds


@dataclass
class Placement:
    """tracks: per speaker (left[, right]) mono 16 kHz float32 `[N·640]`; mix: the muxed audio (`[C, T]`)."""

    tracks: list[torch.Tensor]
    mix: AudioClip
    frames: int
    order: str

    @property
    def duration(self) -> float:
        """Exact video duration N/25 s (= the mix's duration)."""
        return self.frames / FPS


def _fit(x: torch.Tensor, length: int) -> torch.Tensor:
    """Trim or zero-pad the last dim to `length`."""
    if x.shape[-1] >= length:
        return x[..., :length]
    return torch.nn.functional.pad(x, (0, length - x.shape[-1]))


def _channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Up-mix to `channels` (mono is repeated; any other mismatch goes through mono)."""
    if x.shape[0] == channels:
        return x
    mono = x.mean(0, keepdim=True)
    return mono.expand(channels, -1).contiguous()


def place_speakers(left: AudioClip, right: AudioClip | None = None, order: str = "meanwhile") -> Placement:
    """Place one or two speakers' audio on a common timeline (see the module doc for the rules).

    The mix rate is the higher of the inputs' rates, its channel count the larger of theirs. If the sum of
    two simultaneous speakers would clip, the mix (only the mix) is scaled down to peak 1.
    """
    if order not in ORDERS:
        raise InputError("order", f"expected one of {', '.join(ORDERS)}, got {order!r}")
    clips = [left] if right is None else [left, right]
    rate = max(c.sample_rate for c in clips)
    channels = max(c.channels for c in clips)
    at_rate = [_channels(resample(c.samples, c.sample_rate, rate), channels) for c in clips]
    feats = [resample(to_mono(c).samples[0], c.sample_rate, FEATURE_RATE) for c in clips]

    if right is None or order == "meanwhile":
        offsets = [0] * len(clips)
        total = max(x.shape[1] for x in at_rate)
    else:
        first, second = (0, 1) if order == "left_right" else (1, 0)
        offsets = [0, 0]
        offsets[second] = at_rate[first].shape[1]
        total = at_rate[0].shape[1] + at_rate[1].shape[1]

    frames = (total * FPS) // rate
    names = ["left_audio", "right_audio"]
    if frames < 1:
        raise InputError(names[0] if right is None else "audio",
                         f"the audio is {total / rate * 1000:.0f} ms long; at least {1000 // FPS} ms (one video frame) is needed")
    if frames > MAX_FRAMES:
        raise InputError("audio", f"the placed audio is {total / rate:.1f} s long; at most {MAX_SECONDS} s is supported")
    mix_len = int(round(frames * rate / FPS))
    feat_len = frames * FEATURE_RATE // FPS

    mix = torch.zeros(channels, max(total, mix_len))
    tracks = []
    for x, f, off in zip(at_rate, feats, offsets):
        mix[:, off:off + x.shape[1]] += x
        f_off = int(round(off * FEATURE_RATE / rate))
        track = torch.zeros(max(feat_len, f_off + f.shape[0]))
        track[f_off:f_off + f.shape[0]] = f
        tracks.append(_fit(track, feat_len).contiguous())
    mix = _fit(mix, mix_len)
    peak = float(mix.abs().max()) if mix.numel() else 0.0
    if peak > 1.0:
        mix = mix / peak
    return Placement(tracks=tracks, mix=AudioClip(mix.contiguous(), rate), frames=frames, order=order)
