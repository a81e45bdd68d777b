"""wav2vec 2.0 audio encoder (chinese-wav2vec2-base topology) as InfiniteTalk runs it.

Differs from a stock Hugging Face `Wav2Vec2Model` in one place, on purpose (the reference's custom
forward): the CNN features are linearly resampled from 50 Hz to the video frame rate *before* the
feature projection, so the positional conv and the transformer run at 25 Hz. The output is the stack
of the outputs of transformer layers 1..L (`hidden_states[1:]`), `[video_length, L, hidden]`.

State-dict names are Hugging Face's (`feature_extractor.conv_layers.N.conv.weight`, ...); the
positional conv keeps the weight-norm pair `weight_g`/`weight_v` and folds it at every call.

Memory: the conv front end runs over the waveform in overlapping chunks (aligned to the total stride,
overlapping by the receptive field), so its cost is bounded whatever the audio length; the GroupNorm
of conv 0 ("group" mode) normalises over the whole utterance, so its per-channel statistics are
gathered in a first pass. Attention uses SDPA (flash / memory-efficient kernels, no T×T matrix).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .layers import Linear

__all__ = [
    "Wav2Vec2Config", "Wav2Vec2Encoder", "normalize_waveform", "frames_for", "encode_audio",
    "SAMPLE_RATE", "VIDEO_FPS", "NORMALIZE_BY_DEFAULT",
]

SAMPLE_RATE = 16000
VIDEO_FPS = 25
_CONV_NORM_EPS = 1e-5  # nn.GroupNorm / nn.LayerNorm defaults used by the HF conv layers
_CHUNK_FRAMES = 500  # front-end chunk: 500 frames at 50 Hz = 10 s of 16 kHz audio (~0.4 GB peak at width 512)
# Whether `encode_audio` standardises the waveform when the checkpoint comes without a
# `preprocessor_config.json` (the reference uses that file's `do_normalize`; see docs/audio-encoder.md).
# TencentGameMate/chinese-wav2vec2-base ships `do_normalize: false` (ComfyUI's audio-encoder loader
# records the same), and the reference's −23 LUFS loudness step only matters without standardising.
NORMALIZE_BY_DEFAULT = False


def _tuple(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class Wav2Vec2Config:
    """The `transformers.Wav2Vec2Config` fields that change the inference math."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    do_stable_layer_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) > 0):
            raise ValueError(
                f"conv_dim {self.conv_dim}, conv_kernel {self.conv_kernel} and conv_stride {self.conv_stride} "
                "must be non-empty and of equal length")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_conv_pos_embedding_groups <= 0 or self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Wav2Vec2Config":
        """From a `config.json` / `Wav2Vec2Config.to_dict()`; fields without effect at inference are ignored."""
        for key in ("hidden_act", "feat_extract_activation"):
            if d.get(key, "gelu") != "gelu":
                raise ValueError(f"{key}={d[key]!r} is not supported (only exact 'gelu')")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def total_stride(self) -> int:
        """Waveform samples per CNN frame (320 for the base topology: 16 kHz -> 50 Hz)."""
        return math.prod(self.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Waveform samples seen by one CNN frame (400 for the base topology)."""
        r = 1
        for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
            r = (r - 1) * s + k
        return r

    def num_cnn_frames(self, num_samples: int) -> int:
        """CNN output frames for `num_samples` input samples (0 when the input is too short)."""
        n = num_samples
        for k, s in zip(self.conv_kernel, self.conv_stride):
            if n < k:
                return 0
            n = (n - k) // s + 1
        return n


def normalize_waveform(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Zero mean, unit variance like `Wav2Vec2FeatureExtractor(do_normalize=True)`.

    `(x − mean) / sqrt(var + 1e-7)` with the population variance; statistics in float64, result float32.
    """
    t = torch.as_tensor(x)
    if t.ndim != 1:
        raise InputError("audio", f"expected a mono waveform of shape [samples], got shape {tuple(t.shape)}")
    x64 = t.detach().to(device="cpu", dtype=torch.float64)
    mean = x64.mean()
    var = ((x64 - mean) ** 2).mean()
    return ((x64 - mean) / torch.sqrt(var + 1e-7)).to(torch.float32)


def frames_for(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: float = VIDEO_FPS) -> int:
    """Video frames covered by the audio: `int(N / sr · fps)` in float64, as the reference computes it."""
    return int(num_samples / sample_rate * fps)


class ConvLayer(nn.Module):
    """One CNN feature-extractor layer: conv, optional norm (GroupNorm per channel / LayerNorm), GELU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool, norm: str | None):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.norm = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(c_out, c_out, eps=_CONV_NORM_EPS, affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(c_out, eps=_CONV_NORM_EPS, elementwise_affine=True)

    def forward(self, x: torch.Tensor, channel_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`x` [1, C_in, L]. "group" mode needs the utterance-wide per-channel (mean, var) of this conv's output."""
        x = self.conv(x)
        if self.norm == "group":
            mean, var = channel_stats
            scale = self.layer_norm.weight.to(torch.float64) * torch.rsqrt(var + self.layer_norm.eps)
            x = (x - mean.to(x.dtype)[:, None]) * scale.to(x.dtype)[:, None] + self.layer_norm.bias.to(x.dtype)[:, None]
        elif self.norm == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class FeatureEncoder(nn.Module):
    """The strided CNN: waveform [N] -> frames [T50, C] (50 Hz for the base topology)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        c_in, layers = 1, []
        for i, (c, k, s) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
            norm = "layer" if cfg.feat_extract_norm == "layer" else ("group" if i == 0 else None)
            layers.append(ConvLayer(c_in, c, k, s, cfg.conv_bias, norm))
            c_in = c
        self.conv_layers = nn.ModuleList(layers)
        self.chunk_frames = _CHUNK_FRAMES

    def _first_conv_stats(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and population variance of conv 0's output over the whole waveform (float64)."""
        conv = self.conv_layers[0].conv
        k, s = self.cfg.conv_kernel[0], self.cfg.conv_stride[0]
        total = (wave.shape[-1] - k) // s + 1
        step = self.chunk_frames * self.cfg.total_stride // s
        count, mean, m2 = 0, None, None
        for a in range(0, total, step):
            b = min(a + step, total)
            y = conv(wave[None, None, a * s:(b - 1) * s + k])[0].to(torch.float64)
            n = y.shape[-1]
            y_mean = y.mean(dim=-1)
            y_m2 = ((y - y_mean[:, None]) ** 2).sum(dim=-1)
            if mean is None:
                count, mean, m2 = n, y_mean, y_m2
            else:  # Chan et al. parallel combination of (count, mean, M2)
                delta = y_mean - mean
                new = count + n
                mean = mean + delta * (n / new)
                m2 = m2 + y_m2 + delta ** 2 * (count * n / new)
                count = new
        return mean, m2 / count

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        total = cfg.num_cnn_frames(wave.shape[-1])
        if total == 0:
            raise ValueError(f"waveform of {wave.shape[-1]} samples is shorter than the CNN's receptive field "
                             f"({cfg.receptive_field} samples)")
        stats = self._first_conv_stats(wave) if cfg.feat_extract_norm == "group" else None
        hop, field = cfg.total_stride, cfg.receptive_field
        out = torch.empty(total, cfg.conv_dim[-1], dtype=wave.dtype, device=wave.device)
        for a in range(0, total, self.chunk_frames):
            b = min(a + self.chunk_frames, total)
            x = wave[None, None, a * hop:(b - 1) * hop + field]
            for i, layer in enumerate(self.conv_layers):
                x = layer(x, stats if i == 0 else None)
            out[a:b] = x[0].transpose(0, 1)
        return out


class FeatureProjection(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = Linear(cfg.conv_dim[-1], cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x))


class WeightNormConv1d(nn.Module):
    """Grouped conv whose kernel is `g · v / ‖v‖`, the norm per kernel position (weight norm, dim=2)."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.bias = nn.Parameter(torch.empty(channels))

    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return v * (self.weight_g / torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight_v.shape[-1]
        return F.conv1d(x, self.weight().to(x.dtype), self.bias.to(x.dtype), padding=k // 2, groups=self.groups)


class PositionalConvEmbedding(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.conv = WeightNormConv1d(cfg.hidden_size, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [T, C] -> [T, C]; an even kernel yields T+1 outputs, the last is dropped (HF "same pad")."""
        y = self.conv(x.transpose(0, 1)[None])[0, :, : x.shape[0]]
        return F.gelu(y.transpose(0, 1))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, c = x.shape
        q, k, v = (p(x).view(t, self.heads, c // self.heads).transpose(0, 1)[None]
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out[0].transpose(0, 1).reshape(t, c))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.intermediate_dense = Linear(dim, hidden)
        self.output_dense = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class EncoderLayer(nn.Module):
    """Transformer layer: post-LN (base) or pre-LN ("stable layer norm", large models)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pre_norm = cfg.do_stable_layer_norm
        self.attention = SelfAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(cfg.hidden_size, cfg.intermediate_size)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attention(self.layer_norm(x))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pre_norm = cfg.do_stable_layer_norm
        self.pos_conv_embed = PositionalConvEmbedding(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [T, C] -> outputs of every layer, [T, L, C] (HF `hidden_states[1:]`).

        With the stable (pre-LN) layout HF applies the final LayerNorm to the last entry only."""
        x = x + self.pos_conv_embed(x)
        if not self.pre_norm:
            x = self.layer_norm(x)
        out = x.new_empty(x.shape[0], len(self.layers), x.shape[1])
        for i, layer in enumerate(self.layers):
            x = layer(x)
            out[:, i] = x
        if self.pre_norm:
            out[:, -1] = self.layer_norm(x)
        return out


class Wav2Vec2Encoder(nn.Module):
    """waveform [N] (normalised, 16 kHz) -> per-video-frame features [video_length, L, hidden]."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.config = cfg
        self.normalize_input = NORMALIZE_BY_DEFAULT  # `do_normalize` of the checkpoint's preprocessor config
        self.feature_extractor = FeatureEncoder(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.encoder = TransformerEncoder(cfg)

    def forward(self, waveform: torch.Tensor, video_length: int) -> torch.Tensor:
        if waveform.ndim != 1:
            raise ValueError(f"waveform must have shape [samples], got {tuple(waveform.shape)}")
        if video_length < 1:
            raise ValueError(f"video_length must be >= 1, got {video_length}")
        p = self.feature_projection.projection.weight
        dtype = p.dtype if p.dtype.is_floating_point and p.dtype.itemsize >= 2 else torch.float32
        feats = self.feature_extractor(waveform.to(device=p.device, dtype=dtype))  # [T50, C]
        feats = F.interpolate(feats.transpose(0, 1)[None], size=int(video_length), mode="linear",
                              align_corners=True)[0].transpose(0, 1)
        return self.encoder(self.feature_projection(feats))


def encode_audio(model: Wav2Vec2Encoder, samples_16k: torch.Tensor | np.ndarray, fps: float = VIDEO_FPS,
                 normalize: bool | None = None) -> torch.Tensor:
    """Mono 16 kHz samples -> features `[int(N/16000·fps), L, hidden]`.

    The waveform is standardised first when `normalize` (default: `model.normalize_input`, i.e. the
    checkpoint's `do_normalize`)."""
    samples = torch.as_tensor(samples_16k)
    n = samples.shape[-1] if samples.ndim else 0
    frames = frames_for(n, SAMPLE_RATE, fps)
    if samples.ndim != 1 or frames < 1 or model.config.num_cnn_frames(n) < 1:
        raise InputError("audio", f"expected mono 16 kHz samples of at least {1 / fps:.2f} s, "
                                  f"got shape {tuple(samples.shape)}")
    if normalize if normalize is not None else model.normalize_input:
        samples = normalize_waveform(samples)
    else:
        samples = samples.to(torch.float32)
    with torch.inference_mode():
        return model(samples, frames)
