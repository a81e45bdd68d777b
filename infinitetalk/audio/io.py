"""Audio decoding (any format FFmpeg reads, via PyAV) within the limits of `infinitetalk.limits`, mono mix-down,
resampling as the reference does (soxr HQ), wav writing."""
from __future__ import annotations

import math
import os
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import av
import numpy as np
import torch
import soxr

from ..errors import InputError, require_file, unreadable_reason
from ..limits import MAX_AUDIO_VALUES, MAX_PIXELS, MAX_SECONDS, check_audio_format

__all__ = ["AudioInfo", "probe_audio", "decoded_seconds", "open_capped", "stream_seconds", "audio_info", "AudioClip", "FEATURE_RATE", "load_audio", "to_mono", "resample", "write_wav", "AudioSource"]

FEATURE_RATE = 16000   # wav2vec2 input rate
AudioSource = Union[str, os.PathLike, BinaryIO]


# -- header probe: the limits checked before anything is decoded ------------------------------------
@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio input (or a video's audio track). `seconds` may be an estimate, and is NaN
    when the headers do not say (the decoder then enforces the limits as it goes)."""

    sample_rate: int
    channels: int
    seconds: float


def open_capped(path: Path, field: str, what: str) -> av.container.InputContainer:
    """av.open with decoders refusing frames over MAX_PIXELS, so stream probing cannot allocate more."""
    try:
        return av.open(str(path), mode="r", options={"max_pixels": str(MAX_PIXELS)})
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(field, f"cannot read {path}: {unreadable_reason(exc, what + ' file')}") from None


def stream_seconds(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    """Duration of a stream from its headers (the container's when the stream does not say)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1e6
    return None


def audio_info(container: av.container.InputContainer, stream: av.audio.AudioStream, field: str,
               check: bool = True) -> AudioInfo:
    """AudioInfo of an open audio stream, checked against the limits unless `check` is False."""
    rate = int(stream.codec_context.sample_rate or stream.sample_rate or 0)
    channels = int(stream.codec_context.channels or 0)
    seconds = stream_seconds(container, stream)
    if check:
        check_audio_format(rate, channels, seconds, field)
    return AudioInfo(rate, channels, seconds if seconds is not None else float("nan"))


def probe_audio(path: str | os.PathLike, field: str = "left_audio") -> AudioInfo:
    """Check an audio input (or a video's audio track) from its container/stream headers: sample rate,
    channel count, duration and decoded size within `infinitetalk.limits`. InputError(field) otherwise.
    Nothing is decoded; time and memory are bounded whatever the file claims."""
    p = require_file(path, field)
    with open_capped(p, field, "an audio or video") as container:
        if not container.streams.audio:
            raise InputError(field, f"{p} has no audio track")
        return audio_info(container, container.streams.audio[0], field)


def decoded_seconds(path: str | os.PathLike, field: str = "left_audio", max_seconds: float = MAX_SECONDS) -> float:
    """The audio's real length, counted by decoding it (a header's length can be an estimate: an MP3 without a
    Xing/VBRI header is timed by its first frame's bitrate). Frames are counted, not kept, and decoding stops
    once `max_seconds` is passed, so time and memory are bounded. `probe_audio` first; InputError(field)."""
    info = probe_audio(path, field)
    samples, rate = 0, info.sample_rate
    with open_capped(Path(path), field, "audio or video") as container:
        stream = container.streams.audio[0]
        try:
            for frame in container.decode(stream):
                rate = int(frame.sample_rate) or rate
                samples += frame.samples
                if samples > (max_seconds + 1.0 / 25) * rate:
                    raise InputError(field, f"the audio lasts more than {max_seconds:.0f} s (counted by decoding it); "
                                            f"at most {max_seconds:.0f} s ({max_seconds / 60:.0f} minutes) is supported")
        except av.FFmpegError as exc:
            raise InputError(field, f"{path} is corrupt or not a supported audio format ({exc})") from None
    if samples == 0 or not rate:
        raise InputError(field, f"{path} contains no audio samples")
    seconds = samples / rate
    check_audio_format(rate, info.channels, seconds, field)
    return seconds


@dataclass
class AudioClip:
    """Decoded audio: float32 samples `[channels, samples]` in about [−1, 1] at `sample_rate` Hz."""

    samples: torch.Tensor
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


def _describe(source: AudioSource) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "<stream>")


def _open(source: AudioSource, name: str):
    if isinstance(source, (str, os.PathLike)):
        require_file(source, name)
    try:
        return av.open(source if not isinstance(source, os.PathLike) else os.fspath(source), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(name, f"cannot read {_describe(source)}: "
                               f"{unreadable_reason(exc, 'an audio or video file')}") from None


def load_audio(source: AudioSource, name: str = "left_audio", max_seconds: float = MAX_SECONDS) -> AudioClip:
    """Decode the first audio stream of a file (wav, mp3, flac, m4a/aac, ogg, or a video's audio track).

    Keeps the file's own sample rate and channels. A path is first checked from its headers
    (`probe_audio`: sample rate, channels, length, decoded size), and the same limits are enforced
    again while decoding, since headers can lie. InputError (naming `name`) for a missing, empty or
    unreadable file, a file without an audio track or without samples, NaN/inf samples, audio shorter than
    MIN_AUDIO_SECONDS, longer than `max_seconds`, or over MAX_AUDIO_VALUES samples × channels (decoding
    stops as soon as that is clear). Frames are converted to packed float (any channel count is safe).
    """
    if isinstance(source, (str, os.PathLike)):
        probe_audio(source, name)
    with _open(source, name) as container:
        streams = container.streams.audio
        if not streams:
            raise InputError(name, f"{_describe(source)} has no audio track")
        stream = streams[0]
        stream.thread_type = "AUTO"
        if container.duration is not None and container.duration / 1e6 > max_seconds + 1.0:
            raise InputError(name, f"audio is {container.duration / 1e6:.1f} s long; at most {max_seconds:.0f} s "
                                   f"({max_seconds / 60:.0f} minutes) is supported")
        chunks: list[np.ndarray] = []
        total, rate, channels, resampler = 0, None, 0, None

        def take(frames) -> None:
            nonlocal total
            for out in frames:
                chunks.append(out.to_ndarray().reshape(-1, channels))      # packed: [samples, channels]
                total += chunks[-1].shape[0]

        try:
            for frame in container.decode(stream):
                if rate is None:
                    rate, channels = int(frame.sample_rate), len(frame.layout.channels)
                    check_audio_format(rate, channels, None, name)
                    resampler = av.AudioResampler(format="flt", layout=frame.layout, rate=rate)
                elif len(frame.layout.channels) != channels or int(frame.sample_rate) != rate:
                    raise InputError(name, f"{_describe(source)} changes mid-stream from {rate} Hz × {channels} "
                                           f"channels to {int(frame.sample_rate)} Hz × {len(frame.layout.channels)} "
                                           f"channels; one format throughout is needed: convert it first")
                take(resampler.resample(frame))
                if total > (max_seconds + 1.0 / 25) * rate:
                    raise InputError(name, f"audio is longer than {max_seconds:.0f} s "
                                           f"({max_seconds / 60:.0f} minutes), the longest supported")
                if total * channels > MAX_AUDIO_VALUES:
                    raise InputError(name, f"audio decodes to more than {MAX_AUDIO_VALUES / 1e6:.0f} million samples "
                                           f"× channels (MAX_AUDIO_VALUES; {rate} Hz × {channels} channels): use a "
                                           f"lower sample rate or fewer channels")
            if resampler is not None:
                take(resampler.resample(None))
        except av.FFmpegError as exc:
            raise InputError(name, f"{_describe(source)} is corrupt or not a supported audio format "
                                   f"({unreadable_reason(exc, 'decodable audio')})") from None
    if not chunks or rate is None or total == 0:
        raise InputError(name, f"{_describe(source)} contains no audio samples")
    planar = np.empty((channels, total), np.float32)     # filled chunk by chunk, each freed once copied
    chunks.reverse()
    pos = 0
    while chunks:
        chunk = chunks.pop()
        planar[:, pos:pos + chunk.shape[0]] = chunk.T
        pos += chunk.shape[0]
    samples = torch.from_numpy(planar)
    check_audio_format(rate, channels, samples.shape[1] / rate, name)
    if samples.shape[1] > max_seconds * rate + rate // 25:
        raise InputError(name, f"audio is {samples.shape[1] / rate:.1f} s long; at most {max_seconds:.0f} s is supported")
    if not bool(torch.isfinite(samples).all()):
        raise InputError(name, f"{_describe(source)} contains NaN or infinite samples")
    return AudioClip(samples, rate)


def to_mono(clip: AudioClip) -> AudioClip:
    """Average the channels (same as librosa's mono mix-down): `[1, samples]`."""
    return AudioClip(clip.samples.mean(dim=0, keepdim=True), clip.sample_rate)


def resample(samples: torch.Tensor, sr_from: int, sr_to: int) -> torch.Tensor:
    """Resample `[..., T]` float samples the reference's way: soxr "HQ" per channel (what librosa.load and
    librosa.resample use), in float32, then cut or zero-padded to ceil(T·sr_to/sr_from) as librosa's
    `fix_length` does. Deterministic; sample rates must be positive."""
    sr_from, sr_to = int(sr_from), int(sr_to)
    if sr_from <= 0 or sr_to <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_from} → {sr_to}")
    if sr_from == sr_to:
        return samples.clone()
    lead, length = samples.shape[:-1], samples.shape[-1]
    out_len = int(math.ceil(length * sr_to / sr_from))
    rows = samples.detach().reshape(-1, length).to("cpu", torch.float32).numpy()
    out = np.zeros((rows.shape[0], out_len), dtype=np.float32)
    for i, row in enumerate(rows):
        y = soxr.resample(np.ascontiguousarray(row), sr_from, sr_to, "HQ")
        n = min(out_len, y.shape[0])
        out[i, :n] = y[:n]
    dtype = samples.dtype if samples.is_floating_point() else torch.float32
    return torch.from_numpy(out).reshape(*lead, out_len).to(samples.device, dtype)


def write_wav(path: str | os.PathLike, samples: torch.Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write `[channels, samples]` (or `[samples]`) float audio in [−1, 1] as 16-bit PCM wav."""
    x = torch.as_tensor(samples, dtype=torch.float32)
    if x.dim() == 1:
        x = x[None]
    pcm = (x.clamp(-1, 1) * 32767.0).round().to(torch.int16).T.contiguous().numpy()
    p = Path(path)
    with wave.open(str(p), "wb") as w:
        w.setnchannels(int(x.shape[0]))
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return p
