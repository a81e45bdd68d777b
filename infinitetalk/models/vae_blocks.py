"""Building blocks of the Wan2.1 causal 3-D VAE (names as in `Wan2.1_VAE.pth`).

Time is causal: a clip is pushed through the network in chunks (encoder: 1, 4, 4, … frames; decoder:
one latent frame at a time) and every temporal convolution remembers the last frames it saw in a
per-call :class:`CausalState`. Feeding a clip in such chunks gives exactly the reference's result
(its index-based `feat_cache` lists), including two quirks kept on purpose:

- a temporal *upsampler* ignores its first chunk (it passes one frame through, undoubled) and starts
  its own history with zeros at the second chunk;
- a temporal *downsampler* passes its first chunk through unchanged and afterwards convolves
  (stride 2) the last frame of the previous chunk followed by the new ones.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalState", "CausalConv3d", "RMSNorm", "Resample", "ResidualBlock", "AttentionBlock",
           "Encoder3d", "Decoder3d"]


class CausalState:
    """Memory of one causal pass (one encode or decode call, one spatial tile): module -> last frames.

    Created per call, never stored on the model, so concurrent calls and tiles cannot interfere.
    """

    def __init__(self) -> None:
        self.frames: dict[nn.Module, torch.Tensor] = {}
        self.started: set[nn.Module] = set()


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only towards the past in time (2·pad_t frames), symmetrically in space.

    With a state, the padding frames are the last inputs of earlier chunks (zeros before the start)."""

    def __init__(self, in_dim: int, out_dim: int, kernel, stride=1, padding=0):
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=padding)
        self.causal_pad = 2 * self.padding[0]
        self.padding = (0, self.padding[1], self.padding[2])

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:  # type: ignore[override]
        if self.causal_pad == 0:
            return super().forward(x)
        past = state.frames.get(self) if state is not None else None
        seq = x if past is None else torch.cat([past, x], dim=2)
        if state is not None:
            state.frames[self] = seq[:, :, -self.causal_pad:].clone()
        missing = self.causal_pad - (seq.shape[2] - x.shape[2])
        if missing > 0:
            seq = F.pad(seq, (0, 0, 0, 0, missing, 0))
        return super().forward(seq)


class RMSNorm(nn.Module):
    """x / ||x||_channels · √C · gamma (the reference `RMS_norm`, no bias); statistics in fp32."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x.float(), dim=1)
        y.mul_(self.scale).mul_(self.gamma.float())
        return y.to(x.dtype)


def _conv_frames(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D conv to every frame of [B, C, T, H, W] without reshuffling memory."""
    w = conv.weight.unsqueeze(2)
    return F.conv3d(x, w, conv.bias, stride=(1, *conv.stride), padding=(0, *conv.padding))


class Resample(nn.Module):
    """Spatial ×2 up/down-sampling per frame, optionally with a causal temporal ×2 (`time_conv`)."""

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            # nearest-exact ×2 then conv halving the channels; the Upsample is a placeholder for index 0
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        if self.mode == "upsample3d":
            if self not in state.started:
                state.started.add(self)
            else:
                x = self.time_conv(x, state)
                b, c2, t, h, w = x.shape
                # channel halves are the even / odd output frames
                x = x.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        if self.mode.startswith("upsample"):
            b, c, t, h, w = x.shape
            x = x[:, :, :, :, None, :, None].expand(b, c, t, h, 2, w, 2).reshape(b, c, t, 2 * h, 2 * w)
        else:
            x = F.pad(x, (0, 1, 0, 1))
        x = _conv_frames(self.resample[1], x)
        if self.mode == "downsample3d":
            past = state.frames.get(self)
            state.frames[self] = x[:, :, -1:].clone()
            if past is not None:
                x = self.time_conv(torch.cat([past, x], dim=2))
        return x


class ResidualBlock(nn.Module):
    """norm → SiLU → causal conv → norm → SiLU → (dropout) → causal conv, plus a 1×1×1 shortcut."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(inplace=True), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, state) if isinstance(layer, CausalConv3d) else layer(x)
        return x.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no temporal state)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3 * c, h * w).transpose(1, 2)
        q, k, v = (part.unsqueeze(1) for part in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        out = self.proj(out).reshape(b, t, c, h, w).transpose(1, 2)
        return out.contiguous().add_(x)


def _run(layers: nn.Sequential, x: torch.Tensor, state: CausalState) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, (ResidualBlock, Resample, AttentionBlock, CausalConv3d)):
            x = layer(x, state)
        else:
            x = layer(x)
    return x


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(in_dim), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim, 3, padding=1))


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class Encoder3d(nn.Module):
    """Video [B, 3, t, H, W] chunk -> 2·z_dim channels at 1/2^(stages−1) resolution."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 attn_scales: Sequence[float], temperal_downsample: Sequence[bool]):
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], z_dim)

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        x = self.conv1(x, state)
        for part in (self.downsamples, self.middle, self.head):
            x = _run(part, x, state)
        return x


class Decoder3d(nn.Module):
    """Latent [B, z_dim, 1, h, w] (one latent frame) -> video frames [B, 3, n, H, W]."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 attn_scales: Sequence[float], temperal_upsample: Sequence[bool]):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # every upsampler halves the channels it hands on
                in_dim //= 2
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        x = self.conv1(x, state)
        for part in (self.middle, self.upsamples, self.head):
            x = _run(part, x, state)
        return x
