"""ITU-R BS.1770-4 integrated loudness and the reference's −23 LUFS normalisation (as pyloudnorm does it).

The reference measures each speaker track with `pyloudnorm.Meter(16000).integrated_loudness` and, when
`|loudness| <= 100` LUFS, scales it to −23 LUFS; silence (−inf) is left alone. This module reproduces
that in numpy (float64) without scipy: the same K-weighting biquads (RBJ cookbook high shelf +4 dB at
1500 Hz, Q 1/√2; high pass 38 Hz, Q 0.5; designed for the actual sample rate), 400 ms blocks with 75 %
overlap, absolute gate −70 LUFS and relative gate −10 LU, channel weights 1, 1, 1, 1.41, 1.41.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["k_weighting", "integrated_loudness", "normalize_loudness", "BLOCK_SECONDS"]

BLOCK_SECONDS = 0.4
_OVERLAP = 0.75
_ABSOLUTE_GATE = -70.0
_RELATIVE_GATE = -10.0
_CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)
_SKIP_ABOVE = 100.0  # |loudness| above this (e.g. −inf for silence) -> leave the audio alone
_FILTER_BLOCK = 8192


def _biquad_coefficients(kind: str, gain_db: float, q: float, fc: float, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """RBJ-cookbook biquad (b, a), normalised so that a[0] == 1."""
    big_a = 10 ** (gain_db / 40.0)
    w0 = 2.0 * math.pi * (fc / rate)
    cos, alpha = math.cos(w0), math.sin(w0) / (2.0 * q)
    if kind == "high_shelf":
        sq = 2 * math.sqrt(big_a) * alpha
        b = [big_a * ((big_a + 1) + (big_a - 1) * cos + sq),
             -2 * big_a * ((big_a - 1) + (big_a + 1) * cos),
             big_a * ((big_a + 1) + (big_a - 1) * cos - sq)]
        a = [(big_a + 1) - (big_a - 1) * cos + sq,
             2 * ((big_a - 1) - (big_a + 1) * cos),
             (big_a + 1) - (big_a - 1) * cos - sq]
    elif kind == "high_pass":
        b = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2]
        a = [1 + alpha, -2 * cos, 1 - alpha]
    else:
        raise ValueError(f"unknown biquad kind {kind!r}")
    b_arr, a_arr = np.array(b), np.array(a)
    return b_arr / a_arr[0], a_arr / a_arr[0]


def _all_pole(w: np.ndarray, a1: float, a2: float) -> np.ndarray:
    """y[n] = w[n] − a1·y[n−1] − a2·y[n−2] with zero initial state, exactly, in FFT-sized blocks.

    Per block: zero-state response (causal convolution with the impulse response, via FFT) plus the
    response to the two carried-over outputs, a fixed combination of two precomputed sequences."""
    n_blk = min(_FILTER_BLOCK, len(w))
    h = np.empty(n_blk)
    y1 = y2 = 0.0
    for i in range(n_blk):
        y0 = (1.0 if i == 0 else 0.0) - a1 * y1 - a2 * y2
        h[i], y2, y1 = y0, y1, y0
    h_prev = np.concatenate(([0.0], h[:-1]))
    from_y1 = -a1 * h - a2 * h_prev  # response to y[-1] = 1, y[-2] = 0
    from_y2 = -a2 * h                # response to y[-1] = 0, y[-2] = 1
    n_fft = 2 * n_blk
    h_f = np.fft.rfft(h, n_fft)
    out = np.empty_like(w)
    y1 = y2 = 0.0
    for start in range(0, len(w), n_blk):
        seg = w[start:start + n_blk]
        m = len(seg)
        y = np.fft.irfft(np.fft.rfft(seg, n_fft) * h_f, n_fft)[:m]
        y += y1 * from_y1[:m] + y2 * from_y2[:m]
        out[start:start + m] = y
        y1, y2 = y[-1], (y[-2] if m > 1 else y1)
    return out


def _biquad(x: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """`scipy.signal.lfilter(b, a, x)` for one channel, float64."""
    w = b[0] * x
    w[1:] += b[1] * x[:-1]
    w[2:] += b[2] * x[:-2]
    return _all_pole(w, float(a[1]), float(a[2]))


def k_weighting(x: np.ndarray, rate: float) -> np.ndarray:
    """The BS.1770 K-weighting pre-filter (high shelf, then RLB high pass) applied to `x` [samples] in float64."""
    y = np.asarray(x, dtype=np.float64)
    for kind, gain, q, fc in (("high_shelf", 4.0, 1 / math.sqrt(2), 1500.0), ("high_pass", 0.0, 0.5, 38.0)):
        y = _biquad(y, *_biquad_coefficients(kind, gain, q, fc, rate))
    return y


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def integrated_loudness(x: np.ndarray | torch.Tensor, rate: float) -> float:
    """Gated integrated loudness in LUFS of `x` [samples] or [samples, channels ≤ 5]; −inf for silence."""
    data = _as_numpy(x)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or data.shape[1] > len(_CHANNEL_WEIGHTS):
        raise ValueError(f"audio must be [samples] or [samples, channels<=5], got shape {data.shape}")
    n = data.shape[0]
    if n < BLOCK_SECONDS * rate:
        raise ValueError(f"audio of {n} samples is shorter than one {BLOCK_SECONDS * 1000:.0f} ms block")
    step = 1.0 - _OVERLAP
    num_blocks = int(np.round((n / rate - BLOCK_SECONDS) / (BLOCK_SECONDS * step))) + 1
    j = np.arange(num_blocks)
    lo = (BLOCK_SECONDS * (j * step) * rate).astype(np.int64)
    hi = np.minimum((BLOCK_SECONDS * (j * step + 1) * rate).astype(np.int64), n)
    z = np.empty((data.shape[1], num_blocks))  # mean square per channel and block
    for c in range(data.shape[1]):
        energy = np.concatenate(([0.0], np.cumsum(k_weighting(data[:, c], rate) ** 2)))
        z[c] = (energy[hi] - energy[lo]) / (BLOCK_SECONDS * rate)
    weights = np.array(_CHANNEL_WEIGHTS[: data.shape[1]])[:, None]
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10.0 * np.log10((weights * z).sum(axis=0))
        above_abs = block_lufs >= _ABSOLUTE_GATE
        if not above_abs.any():
            return -math.inf
        relative = -0.691 + 10.0 * np.log10((weights[:, 0] * z[:, above_abs].mean(axis=1)).sum()) + _RELATIVE_GATE
        gated = (block_lufs > relative) & (block_lufs > _ABSOLUTE_GATE)
        if not gated.any():
            return -math.inf
        return float(-0.691 + 10.0 * np.log10((weights[:, 0] * z[:, gated].mean(axis=1)).sum()))


def normalize_loudness(x: np.ndarray | torch.Tensor, rate: float, target: float = -23.0) -> np.ndarray | torch.Tensor:
    """`x` scaled to `target` LUFS (same type, dtype and device as `x`); unchanged when the measured
    loudness is beyond ±100 LUFS (silence) or the audio is shorter than one 400 ms block.

    No limiter: like the reference, peaks may exceed 1.0 after the gain."""
    n = x.shape[0] if x.ndim else 0
    if n < BLOCK_SECONDS * rate:
        return x
    loudness = integrated_loudness(x, rate)
    if not abs(loudness) <= _SKIP_ABOVE:
        return x
    gain = 10.0 ** ((target - loudness) / 20.0)
    if isinstance(x, torch.Tensor):
        return (x.to(torch.float64) * gain).to(x.dtype)
    return (np.asarray(x, dtype=np.float64) * gain).astype(np.asarray(x).dtype, copy=False)
