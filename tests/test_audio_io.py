"""Audio decoding of common formats, input errors, resampling, speaker placement."""
from __future__ import annotations

import math
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from infinitetalk.audio.io import AudioClip, load_audio, resample, to_mono, write_wav
from infinitetalk.audio.placement import ORDERS, place_speakers
from infinitetalk.errors import InputError


def _tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1) -> torch.Tensor:
    t = torch.arange(int(round(seconds * sr)), dtype=torch.float64) / sr
    x = (0.5 * torch.sin(2 * math.pi * freq * t)).float()
    return x[None].repeat(channels, 1)


def _encode(path, codec: str, samples: torch.Tensor, sr: int, fmt: str | None = None):
    """Write `samples` [C, T] with PyAV's encoder `codec` (test fixture files)."""
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=sr, layout=layout)
        supported = [f.name for f in s.codec_context.codec.audio_formats]
        fmt_name = next(f for f in ("fltp", "flt", "s16p", "s16", "s32p", "s32") if f in supported)
        x = samples.numpy().astype(np.float32)
        step = s.codec_context.frame_size or 1024
        for pos in range(0, x.shape[1], step):
            piece = x[:, pos:pos + step]
            if fmt_name.startswith("s16"):
                piece = (piece * 32767).astype(np.int16)
            elif fmt_name.startswith("s32"):
                piece = (piece * 2147483647.0).astype(np.int32)
            if not fmt_name.endswith("p"):
                piece = piece.T.reshape(1, -1)
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format=fmt_name, layout=layout)
            f.sample_rate, f.pts, f.time_base = sr, pos, Fraction(1, sr)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


@pytest.mark.parametrize("name,codec,fmt,sr,channels", [
    ("a.flac", "flac", None, 44100, 2),
    ("a.mp3", "libmp3lame", None, 44100, 1),
    ("a.m4a", "aac", "mp4", 48000, 2),
    ("a.ogg", "libopus", "ogg", 48000, 1),
])
def test_decodes_common_formats(tmp_path, name, codec, fmt, sr, channels):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this PyAV build")
    src = _tone(1.0, sr, channels=channels)
    _encode(tmp_path / name, codec, src, sr, fmt)
    clip = load_audio(tmp_path / name, "left_audio")
    assert clip.sample_rate == sr and clip.channels == channels
    assert abs(clip.duration - 1.0) < 0.08                   # codec priming/padding only
    # the content is the tone: its dominant frequency is 440 Hz
    spec = torch.fft.rfft(clip.samples[0, : sr // 2].double()).abs()
    assert abs(int(spec.argmax()) * 2 - 440) <= 2


def test_wav_roundtrip_mono_and_file_object(tmp_path):
    x = _tone(0.5, 22050, channels=2)
    x[1] *= 0.5
    write_wav(tmp_path / "s.wav", x, 22050)
    clip = load_audio(tmp_path / "s.wav")
    assert clip.samples.dtype == torch.float32 and clip.samples.shape == x.shape
    torch.testing.assert_close(clip.samples, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(to_mono(clip).samples[0], x.mean(0), atol=1e-4, rtol=0)
    with open(tmp_path / "s.wav", "rb") as fh:
        assert load_audio(fh).num_samples == x.shape[1]


def test_audio_track_of_a_video(tmp_path):
    from infinitetalk.video.writer import Mp4Writer

    with Mp4Writer(tmp_path / "v.mp4", 32, 32, audio=AudioClip(_tone(2.0, 16000), 16000)) as w:
        w.write(torch.zeros(25, 32, 32, 3, dtype=torch.uint8))
    clip = load_audio(tmp_path / "v.mp4", "right_audio")
    assert clip.sample_rate == 16000 and abs(clip.duration - 1.0) < 0.07


def test_bad_audio_inputs_name_the_input(tmp_path):
    with pytest.raises(InputError, match="left_audio: file not found"):
        load_audio(tmp_path / "missing.wav", "left_audio")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(InputError, match="right_audio: the file is empty"):
        load_audio(tmp_path / "empty.wav", "right_audio")
    (tmp_path / "junk.mp3").write_bytes(b"this is not audio at all" * 50)
    with pytest.raises(InputError, match="right_audio"):
        load_audio(tmp_path / "junk.mp3", "right_audio")
    write_wav(tmp_path / "zero.wav", torch.zeros(1, 0), 16000)
    with pytest.raises(InputError, match="left_audio: .*no audio samples"):
        load_audio(tmp_path / "zero.wav", "left_audio")
    bad = _tone(0.2, 16000)
    bad[0, 100] = float("nan")
    _encode(tmp_path / "nan.wav", "pcm_f32le", bad, 16000, "wav")
    with pytest.raises(InputError, match="left_audio: .*NaN"):
        load_audio(tmp_path / "nan.wav", "left_audio")
    # image without audio
    from infinitetalk.video.writer import Mp4Writer

    with Mp4Writer(tmp_path / "silent.mp4", 32, 32) as w:
        w.write(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(InputError, match="no audio track"):
        load_audio(tmp_path / "silent.mp4", "left_audio")


def test_too_long_audio_is_rejected(tmp_path):
    write_wav(tmp_path / "long.wav", torch.zeros(1, 8000 * 601), 8000)
    with pytest.raises(InputError, match="left_audio: .*600 s"):
        load_audio(tmp_path / "long.wav", "left_audio")
    write_wav(tmp_path / "ok.wav", torch.zeros(1, 8000 * 3), 8000)
    with pytest.raises(InputError, match="longer than 2 s"):
        load_audio(tmp_path / "ok.wav", "left_audio", max_seconds=2)


@pytest.mark.parametrize("sr_from,sr_to", [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 44100)])
def test_resample_quality_and_determinism(sr_from, sr_to):
    x = _tone(1.0, sr_from, freq=1000.0)
    y = resample(x, sr_from, sr_to)
    assert y.shape == (1, math.ceil(x.shape[1] * sr_to / sr_from))
    want = _tone(1.0, sr_to, freq=1000.0)[:, : y.shape[1]]
    assert float((y - want)[:, 400:-400].abs().max()) < 1e-4
    assert torch.equal(y, resample(x, sr_from, sr_to))
    # a tone above the new Nyquist is removed, not aliased
    if sr_to < sr_from:
        hi = resample(_tone(1.0, sr_from, freq=0.6 * sr_from / 2), sr_from, sr_to)
        assert float(hi[:, 400:-400].abs().max()) < 1e-3


def test_place_speakers_orders():
    left = AudioClip(_tone(2.0, 44100) + 0.1, 44100)
    right = AudioClip(_tone(1.2, 48000, freq=300, channels=2) + 0.1, 48000)

    both = place_speakers(left, right, "meanwhile")
    assert both.frames == 50 and both.duration == 2.0
    assert both.mix.sample_rate == 48000 and both.mix.samples.shape == (2, 96000)
    assert all(t.shape == (50 * 640,) for t in both.tracks)
    assert float(both.tracks[1][20000:].abs().max()) == 0.0            # right is silent after its 1.2 s

    seq = place_speakers(left, right, "left_right")
    assert seq.frames == 80 and seq.mix.samples.shape[1] == 80 * 48000 // 25
    l, r = seq.tracks
    assert float(l[32000 + 10:].abs().max()) == 0 and float(r[: 32000 - 10].abs().max()) == 0
    assert float(l[:31000].abs().min()) > 0 and float(r[33000:51000].abs().min()) > 0

    rev = place_speakers(left, right, "right_left")
    l, r = rev.tracks
    assert float(r[19200 + 10:].abs().max()) == 0 and float(l[: 19200 - 10].abs().max()) == 0

    solo = place_speakers(AudioClip(_tone(1.0, 16000), 16000), None, "left_right")
    assert len(solo.tracks) == 1 and solo.frames == 25
    torch.testing.assert_close(solo.tracks[0], _tone(1.0, 16000)[0])


def test_place_speakers_errors_and_duration_rule():
    short = AudioClip(torch.zeros(1, 500), 16000)   # 31 ms < one frame
    with pytest.raises(InputError, match="left_audio"):
        place_speakers(short)
    with pytest.raises(InputError, match="order: .*meanwhile, left_right, right_left"):
        place_speakers(AudioClip(torch.zeros(1, 16000), 16000), None, "sideways")
    assert ORDERS == ("meanwhile", "left_right", "right_left")
    # N = floor(samples·25/sr); the mix is exactly N/25 s
    p = place_speakers(AudioClip(torch.rand(1, 44100 + 1763) * 0.1, 44100))
    assert p.frames == 25 and p.mix.samples.shape[1] == 44100
    p = place_speakers(AudioClip(torch.rand(1, 44100 + 1764) * 0.1, 44100))
    assert p.frames == 26 and p.mix.samples.shape[1] == 44100 + 1764
    loud = place_speakers(AudioClip(torch.ones(1, 16000) * 0.8, 16000), AudioClip(torch.ones(1, 16000) * 0.8, 16000))
    assert float(loud.mix.samples.abs().max()) <= 1.0 and float(loud.tracks[0].max()) == pytest.approx(0.8)


@pytest.mark.parametrize("sr_from", [8000, 22050, 44100, 48000, 96000])
def test_resample_matches_soxr_hq_as_librosa_uses_it(sr_from):
    import soxr

    gen = torch.Generator().manual_seed(sr_from)
    x = (torch.randn(2, int(0.7 * sr_from) + 3, generator=gen) * 0.2).float()
    y = resample(x, sr_from, 16000)
    n = math.ceil(x.shape[1] * 16000 / sr_from)
    assert y.shape == (2, n) and y.dtype == torch.float32
    for ch in range(2):
        want = soxr.resample(x[ch].numpy(), sr_from, 16000, "HQ")
        want = np.pad(want, (0, max(0, n - want.shape[0])))[:n]                # librosa's fix_length
        rel = np.linalg.norm(y[ch].numpy() - want) / np.linalg.norm(want)
        assert rel <= 1e-6, (sr_from, ch, rel)


def _wav_bytes(path, channels: int, rate: int, frames: int, width: int = 2) -> None:
    """A PCM wav written with the stdlib (no encoder limits on rate or channel count)."""
    import wave
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes((np.arange(frames * channels) % 200 - 100).astype("<i2").tobytes())


@pytest.mark.parametrize("channels", [6, 8, 9, 12])
def test_many_channel_wav_decodes_without_native_crash(tmp_path, channels):
    # planar float conversion of ≥ 8 channels crashed the process in PyAV; packed conversion is safe
    _wav_bytes(tmp_path / "multi.wav", channels, 16000, 4000)
    clip = load_audio(tmp_path / "multi.wav", "left_audio")
    assert clip.samples.shape == (channels, 4000)
    want = (np.arange(4000 * channels) % 200 - 100).reshape(4000, channels).T / 32768.0
    assert np.allclose(clip.samples.numpy(), want, atol=1e-7)


def test_audio_limits_refuse_with_field_value_and_limit(tmp_path):
    _wav_bytes(tmp_path / "short.wav", 1, 16000, 480)                          # 30 ms
    with pytest.raises(InputError, match=r"right_audio: .*30 ms.*at least 100 ms"):
        load_audio(tmp_path / "short.wav", "right_audio")
    _wav_bytes(tmp_path / "fast.wav", 1, 384000, 38400)
    with pytest.raises(InputError, match=r"left_audio: .*384000 Hz.*192000 Hz"):
        load_audio(tmp_path / "fast.wav", "left_audio")
    _wav_bytes(tmp_path / "wide.wav", 33, 8000, 800)
    with pytest.raises(InputError, match=r"left_audio: .*33 channels.*32"):
        load_audio(tmp_path / "wide.wav", "left_audio")


def test_format_change_mid_stream_is_refused_naming_both_formats(tmp_path):
    if "libmp3lame" not in av.codecs_available:
        pytest.skip("libmp3lame not in this PyAV build")
    parts = []
    for i, (sr, channels) in enumerate(((44100, 1), (22050, 2))):      # two mp3 streams glued together
        _encode(tmp_path / f"p{i}.mp3", "libmp3lame", _tone(0.5, sr, channels=channels), sr, None)
        parts.append((tmp_path / f"p{i}.mp3").read_bytes())
    (tmp_path / "glued.mp3").write_bytes(b"".join(parts))
    with pytest.raises(InputError, match=r"^left_audio: .*glued\.mp3 changes mid-stream from \d+ Hz × \d channels "
                                         r"to \d+ Hz × \d channels"):
        load_audio(tmp_path / "glued.mp3", "left_audio")
