"""Input budgets: the numbers, and the pure checks of facts against them.

Every media input (image, video, mask, audio) is probed from its headers before any decoding or model
work, by the reader that knows its format: `audio.io.probe_audio`, `video.reader.probe_image` /
`probe_video`, `pipeline.masks.check_mask`. Probes read only headers (a few kB, bounded time and memory),
so a decompression bomb — a 300 kB PNG of 16000×16000 pixels, a 28 kB FLAC of 384 kHz silence — is
refused in milliseconds with an InputError naming the field, the value found and the limit; the
decoders enforce the same limits again while decoding, since headers can lie. This module imports
nothing of ours but `errors`, so every layer may read the numbers.

The limits are documented in docs/media.md; change them here only.
"""
from __future__ import annotations

from .errors import InputError

__all__ = [
    "FPS", "MAX_SECONDS", "MAX_FRAMES", "MAX_PIXELS", "MAX_SIDE", "MIN_SIDE", "MAX_SAMPLE_RATE", "MIN_SAMPLE_RATE", "MAX_AUDIO_CHANNELS",
    "MAX_AUDIO_VALUES", "MIN_AUDIO_SECONDS", "MAX_AUDIO_SECONDS", "MAX_VIDEO_SECONDS", "EMPTY_MASK",
    "check_pixels", "check_audio_format",
]

# -- the limits ------------------------------------------------------------------------------------------
FPS = 25                         # video frames per second everywhere (audio features are resampled to it)
MAX_SECONDS = 600                # longest audio a job accepts (10 minutes)
MAX_FRAMES = MAX_SECONDS * FPS   # video frames of the longest job
MAX_PIXELS = 40_000_000          # pixels of one image / video frame (40 MP: e.g. 8000×5000); RGB ≈ 120 MB
MAX_SIDE = 16384                 # longest side of an image / frame in pixels
MIN_SIDE = 32                    # smaller pictures cannot make a useful video (latents are 1/8 of the pixels)
MAX_SAMPLE_RATE = 192_000        # Hz; higher-rate audio is refused (everything is resampled to ≤ 48 kHz anyway)
MIN_SAMPLE_RATE = 4_000          # Hz; below this there is no speech to hear
MAX_AUDIO_CHANNELS = 32          # channels of one audio stream (any count up to this decodes; mixed down later)
MAX_AUDIO_VALUES = 64_000_000    # decoded samples × channels of one audio input (256 MB as float32);
#                                  e.g. 10 min of 48 kHz stereo = 57.6 M fits, 10 min of 96 kHz stereo does not
MIN_AUDIO_SECONDS = 0.1          # 2.5 video frames: shorter clips hold no speech to lip-sync (and used to fail late)
MAX_AUDIO_SECONDS = float(MAX_SECONDS)  # 10 minutes: the longest audio a job accepts (MAX_SECONDS)
MAX_VIDEO_SECONDS = 3600.0       # a reference video may be longer than the audio (only the start is read)

EMPTY_MASK = ("the mask is empty (all black or fully transparent): nothing would move; paint the regions that "
              "may move white (or opaque)")


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
