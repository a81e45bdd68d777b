"""One stereo conversation file instead of two tracks: the left channel is the person on the left, the right
channel the person on the right, already on a common timeline (so they are placed `meanwhile`).

The features come from each channel alone; the mp4 keeps the file's own stereo (each voice stays on its
side), trimmed to the video length exactly as a placed mix would be.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from .io import AudioClip
from .placement import Placement, place_speakers

__all__ = ["split_stereo", "place_stereo"]


def split_stereo(clip: AudioClip, name: str = "stereo_audio") -> tuple[AudioClip, AudioClip]:
    """(left, right) mono clips of a two-channel file; anything but two channels is an InputError."""
    if clip.channels != 2:
        raise InputError(name, f"has {clip.channels} audio channel(s); a conversation file needs exactly 2 "
                               "(left channel = the person on the left, right channel = the person on the right)")
    if torch.equal(clip.samples[0], clip.samples[1]):
        raise InputError(name, "both channels are identical (a mono recording saved as stereo?); the left "
                               "channel must hold only the left person and the right channel only the right person")
    left, right = (AudioClip(clip.samples[i:i + 1].contiguous(), clip.sample_rate) for i in (0, 1))
    return left, right


def place_stereo(clip: AudioClip, name: str = "stereo_audio") -> Placement:
    """Both channels placed `meanwhile` (features per speaker); the mix is the original stereo."""
    left, right = split_stereo(clip, name)
    placement = place_speakers(left, right, "meanwhile")
    # the placed mix is the file cut to whole video frames (never longer: both channels have its length)
    placement.mix = AudioClip(clip.samples[:, :placement.mix.num_samples].contiguous(), clip.sample_rate)
    return placement
