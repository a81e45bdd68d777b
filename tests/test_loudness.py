"""BS.1770-4 integrated loudness and the reference's −23 LUFS normalisation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from infinitetalk.audio.loudness import _biquad, _biquad_coefficients, integrated_loudness, k_weighting, normalize_loudness


def sine(freq: float, rate: int, seconds: float, amplitude: float = 1.0) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def direct_biquad(x: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Sample-by-sample difference equation (slow, obviously right)."""
    y = np.zeros_like(x)
    for n in range(len(x)):
        acc = b[0] * x[n]
        if n >= 1:
            acc += b[1] * x[n - 1] - a[1] * y[n - 1]
        if n >= 2:
            acc += b[2] * x[n - 2] - a[2] * y[n - 2]
        y[n] = acc
    return y


@pytest.mark.parametrize("kind,gain,q,fc", [("high_shelf", 4.0, 1 / math.sqrt(2), 1500.0), ("high_pass", 0.0, 0.5, 38.0)])
@pytest.mark.parametrize("rate", [16000, 48000])
def test_block_filter_equals_difference_equation(kind, gain, q, fc, rate):
    x = np.random.default_rng(0).standard_normal(20_011)  # several FFT blocks plus a ragged tail
    b, a = _biquad_coefficients(kind, gain, q, fc, rate)
    want = direct_biquad(x, b, a)
    assert np.abs(_biquad(x, b, a) - want).max() < 1e-9 * np.abs(want).max()


def test_k_weighting_response():
    rate = 48000
    gain_db = {}
    for f in (25.0, 1000.0, 10_000.0):
        y = k_weighting(sine(f, rate, 2.0), rate)[rate:]  # skip the transient
        gain_db[f] = 20 * math.log10(np.sqrt(2 * np.mean(y ** 2)))
    assert abs(gain_db[1000.0] - 0.691) < 0.1  # what the −0.691 dB offset of the formula cancels
    assert 3.5 < gain_db[10_000.0] < 4.3    # +4 dB high shelf
    assert gain_db[25.0] < -3.0             # RLB high pass


def test_known_values_full_scale_and_half_amplitude_sine():
    full = integrated_loudness(sine(1000.0, 48000, 5.0), 48000)
    half = integrated_loudness(sine(1000.0, 48000, 5.0, 0.5), 48000)
    assert abs(full - (-3.01)) < 0.1
    assert abs((full - half) - 20 * math.log10(2)) < 0.01


def test_relative_gate_drops_quiet_passages():
    rng = np.random.default_rng(1)
    loud = 0.2 * rng.standard_normal(16000 * 4)
    quiet = 0.002 * rng.standard_normal(16000 * 4)  # 40 dB down: below the −10 LU relative gate
    alone = integrated_loudness(loud, 16000)
    mixed = integrated_loudness(np.concatenate([loud, quiet]), 16000)
    ungated_mean_power_drop = 10 * math.log10(2)  # what averaging without the gate would cost
    assert abs(mixed - alone) < 0.2 < ungated_mean_power_drop


def test_stereo_channels_add_power():
    x = sine(1000.0, 48000, 3.0, 0.5)
    mono = integrated_loudness(x, 48000)
    stereo = integrated_loudness(np.stack([x, x], axis=1), 48000)
    assert abs(stereo - mono - 10 * math.log10(2)) < 0.01


def test_normalize_to_target_and_types():
    rng = np.random.default_rng(2)
    speechlike = (0.05 * rng.standard_normal(16000 * 6) * (1 + np.sin(np.arange(16000 * 6) / 3000))).astype(np.float32)
    out = normalize_loudness(speechlike, 16000)
    assert out.dtype == np.float32 and out.shape == speechlike.shape
    assert abs(integrated_loudness(out, 16000) - (-23.0)) < 0.1
    t = torch.from_numpy(speechlike)
    out_t = normalize_loudness(t, 16000, target=-16.0)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    assert abs(integrated_loudness(out_t, 16000) - (-16.0)) < 0.1


def test_silence_and_too_short_audio_are_left_alone():
    silence = np.zeros(16000 * 2, dtype=np.float32)
    assert integrated_loudness(silence, 16000) == -math.inf
    assert normalize_loudness(silence, 16000) is silence
    nearly_silent = np.full(16000 * 2, 1e-9)  # loudness far below −100 LUFS: skipped like the reference
    assert normalize_loudness(nearly_silent, 16000) is nearly_silent
    short = np.ones(1000, dtype=np.float32) * 0.1
    assert normalize_loudness(short, 16000) is short
    with pytest.raises(ValueError, match="block"):
        integrated_loudness(short, 16000)


def test_agrees_with_pyloudnorm_when_installed():
    pyln = pytest.importorskip("pyloudnorm")
    pytest.importorskip("scipy")
    rng = np.random.default_rng(3)
    for rate, x in ((16000, 0.1 * rng.standard_normal(16000 * 3)), (44100, 0.3 * rng.standard_normal((44100 * 2, 2))),
                    (16000, np.concatenate([0.3 * rng.standard_normal(16000), 1e-3 * rng.standard_normal(16000 * 2)]))):
        assert abs(integrated_loudness(x, rate) - pyln.Meter(rate).integrated_loudness(x)) < 1e-6
