"""Wan2.1 causal 3-D VAE: video [3, 1+4k, H, W] in [−1, 1] <-> normalised latent [16, 1+k, H/8, W/8].

State-dict names equal `Wan2.1_VAE.pth` (`encoder.*`, `conv1`, `conv2`, `decoder.*`). Encoding runs the
encoder causally on chunks of 1, 4, 4, … frames, decoding one latent frame at a time, both with
per-call feature caches (see `vae_blocks`), which bounds memory by a few frames of activations and
lets decoded frames be streamed out as soon as they exist. Optional spatial tiling (overlapping tiles
blended with linear ramps) bounds memory further at the cost of small seam differences.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .vae_blocks import CausalState, CausalConv3d, Decoder3d, Encoder3d

__all__ = ["WanVAE", "VAEConfig", "LATENTS_MEAN", "LATENTS_STD", "Tile"]

# Per-channel latent statistics hard-coded in the reference wrapper (`wan/modules/vae.py::WanVAE`).
LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

ENCODE_CHUNK = 4  # video frames per causal encoder chunk after the first single frame

Tile = tuple[int, int, int]  # (tile_h, tile_w, overlap) in latent pixels


@dataclass(frozen=True)
class VAEConfig:
    """`WanVAE_` constructor arguments (defaults = the real Wan2.1 VAE) plus the latent statistics."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = field(default=LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=LATENTS_STD)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """From reference-style kwargs (lists for tuples); unknown keys (dropout, …) are ignored."""
        known = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kw)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)


class WanVAE(nn.Module):
    """The Wan2.1 VAE with the reference's causal chunked encode / per-frame decode."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        c = config
        if len(c.latents_mean) != c.z_dim or len(c.latents_std) != c.z_dim:
            raise ValueError(f"latents_mean/std need {c.z_dim} values")
        if len(c.temperal_downsample) != len(c.dim_mult) - 1:
            raise ValueError("temperal_downsample needs one flag per downsampling stage (len(dim_mult) − 1)")
        self.config = c
        self.encoder = Encoder3d(c.dim, c.z_dim * 2, c.dim_mult, c.num_res_blocks, c.attn_scales,
                                 c.temperal_downsample)
        self.conv1 = CausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)
        self.conv2 = CausalConv3d(c.z_dim, c.z_dim, 1)
        self.decoder = Decoder3d(c.dim, c.z_dim, c.dim_mult, c.num_res_blocks, c.attn_scales,
                                 tuple(c.temperal_downsample)[::-1])

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as [z, 1, 1, 1] tensors; 1/std as the reference computes it (fp32 reciprocal)."""
        kw = dict(dtype=torch.float32, device=self.device)
        mean = torch.tensor(self.config.latents_mean, **kw).view(-1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(self.config.latents_std, **kw).view(-1, 1, 1, 1)
        return mean, inv_std

    def frames_for(self, latent_frames: int) -> int:
        """Video frames decoded from `latent_frames` latent frames (1 + 4·(t − 1) for Wan2.1)."""
        return 1 + self.config.temporal_stride * (latent_frames - 1) if latent_frames > 0 else 0

    def _check_video(self, video: torch.Tensor) -> None:
        s = self.config.spatial_stride
        if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[0] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise InputError("video", f"expected a tensor [3, T, H, W] in [-1, 1], got {shape}")
        _, t, h, w = video.shape
        if t < 1 or (t - 1) % ENCODE_CHUNK:
            raise InputError("video", f"frame count must be 1 + 4k (1, 5, 9, …, 81), got {t}")
        if h < s or w < s or h % s or w % s:
            raise InputError("video", f"height and width must be positive multiples of {s}, got {h}x{w}")

    def _check_latent(self, latent: torch.Tensor) -> None:
        z = self.config.z_dim
        if not isinstance(latent, torch.Tensor) or latent.dim() != 4 or latent.shape[0] != z:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise InputError("latent", f"expected a tensor [{z}, t, h, w], got {shape}")
        if min(latent.shape[1:]) < 1:
            raise InputError("latent", f"empty latent {tuple(latent.shape)}")

    # ---- encode ---------------------------------------------------------------------------------
    def _encode_mu(self, x: torch.Tensor) -> torch.Tensor:
        """[1, 3, T, H, W] (model dtype) -> mu [1, z, t, h, w]: causal chunks 1, 4, 4, …"""
        state = CausalState()
        t = x.shape[2]
        chunks = [self.encoder(x[:, :, :1].contiguous(), state)]
        for start in range(1, t, ENCODE_CHUNK):
            chunks.append(self.encoder(x[:, :, start:start + ENCODE_CHUNK].contiguous(), state))
        out = self.conv1(torch.cat(chunks, dim=2))
        return out[:, : self.config.z_dim]

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tile: Tile | None = None) -> torch.Tensor:
        """video [3, 1+4k, H, W] in [−1, 1] -> normalised latent [z, 1+k, H/8, W/8] (float32)."""
        self._check_video(video)
        x = video.to(device=self.device, dtype=self.dtype)[None]
        if tile is None:
            mu = self._encode_mu(x)[0].float()
        else:
            mu = _tiled_encode(self, x, _check_tile(tile)).float()
        mean, inv_std = self._stats()
        return (mu - mean) * inv_std

    # ---- decode ---------------------------------------------------------------------------------
    def _prepare_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> conv2 input space [1, z, t, h, w] in model dtype."""
        self._check_latent(latent)
        mean, inv_std = self._stats()
        z = latent.to(device=self.device, dtype=torch.float32) / inv_std + mean
        return self.conv2(z.to(self.dtype)[None])

    def _decode_frames(self, x: torch.Tensor, state: CausalState) -> Iterator[torch.Tensor]:
        """conv2 output [1, z, t, h, w] -> per latent frame, its decoded frames [1, 3, n, H, W]."""
        for i in range(x.shape[2]):
            yield self.decoder(x[:, :, i:i + 1].contiguous(), state)

    def decode_stream(self, latent: torch.Tensor, tile: Tile | None = None) -> Iterator[torch.Tensor]:
        """Yield decoded frames [3, n, H, W] (float32, clamped to [−1, 1]) as each latent frame is
        decoded: 1 frame for the first latent frame, then 4 per latent frame. Inputs are checked here,
        before the first frame is asked for."""
        with torch.no_grad():
            x = self._prepare_latent(latent)
        return self._stream(x, None if tile is None else _check_tile(tile))

    @torch.no_grad()
    def _stream(self, x: torch.Tensor, tile: Tile | None) -> Iterator[torch.Tensor]:
        frames = self._decode_frames(x, CausalState()) if tile is None else _tiled_decode_frames(self, x, tile)
        for out in frames:
            yield out[0].float().clamp_(-1.0, 1.0)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, tile: Tile | None = None) -> torch.Tensor:
        """Normalised latent [z, t, h, w] -> video [3, 1+4(t−1), 8h, 8w] in [−1, 1] (float32)."""
        parts = list(self.decode_stream(latent, tile=tile))
        return torch.cat(parts, dim=1)


# ---- spatial tiling ---------------------------------------------------------------------------------
def _check_tile(tile: Tile) -> Tile:
    try:
        th, tw, ov = (int(v) for v in tile)
    except (TypeError, ValueError):
        raise InputError("tile", f"expected (tile_h, tile_w, overlap) in latent pixels, got {tile!r}") from None
    if th < 1 or tw < 1 or ov < 0 or ov >= min(th, tw):
        raise InputError("tile", f"need tile_h, tile_w >= 1 and 0 <= overlap < min(tile_h, tile_w), got {tile!r}")
    return th, tw, ov


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Tile [start, end) ranges covering 0..size; the last tile is aligned to the end."""
    if tile >= size:
        return [(0, size)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [(s, s + tile) for s in starts]


def _ramp(span: tuple[int, int], size: int, overlap: int, scale: int, device) -> torch.Tensor:
    """Blend weights along one axis of a tile (output pixels): linear ramps where a neighbour overlaps."""
    n, o = (span[1] - span[0]) * scale, overlap * scale
    w = torch.ones(n, dtype=torch.float32, device=device)
    if o > 0:
        ramp = (torch.arange(o, dtype=torch.float32, device=device) + 0.5) / o
        if span[0] > 0:
            w[:o] = torch.minimum(w[:o], ramp)
        if span[1] < size:
            w[n - o:] = torch.minimum(w[n - o:], ramp.flip(0))
    return w


def _tiles(h: int, w: int, tile: Tile, scale: int, device):
    """[(ys, ye, xs, xe) in latent px, weight [H_tile, W_tile] in output px] for every tile."""
    th, tw, ov = tile
    out = []
    for ys, ye in _spans(h, th, ov):
        wy = _ramp((ys, ye), h, ov, scale, device)
        for xs, xe in _spans(w, tw, ov):
            wx = _ramp((xs, xe), w, ov, scale, device)
            out.append(((ys, ye, xs, xe), wy[:, None] * wx[None, :]))
    return out


def _tiled_encode(vae: WanVAE, x: torch.Tensor, tile: Tile) -> torch.Tensor:
    """mu [z, t, h, w] from overlapping spatial tiles encoded independently and blended."""
    s = vae.config.spatial_stride
    h, w = x.shape[3] // s, x.shape[4] // s
    acc = weight = None
    for (ys, ye, xs, xe), wt in _tiles(h, w, tile, 1, vae.device):
        mu = vae._encode_mu(x[:, :, :, ys * s:ye * s, xs * s:xe * s].contiguous())[0].float()
        if acc is None:
            acc = mu.new_zeros((mu.shape[0], mu.shape[1], h, w))
            weight = mu.new_zeros((h, w))
        acc[:, :, ys:ye, xs:xe] += mu * wt
        weight[ys:ye, xs:xe] += wt
    return acc / weight


def _tiled_decode_frames(vae: WanVAE, x: torch.Tensor, tile: Tile) -> Iterator[torch.Tensor]:
    """Per latent frame, frames [1, 3, n, H, W] blended from tiles, each tile with its own causal state."""
    s = vae.config.spatial_stride
    h, w = x.shape[3], x.shape[4]
    tiles = _tiles(h, w, tile, s, x.device)
    states = [CausalState() for _ in tiles]
    weight = torch.zeros((h * s, w * s), dtype=torch.float32, device=x.device)
    for (ys, ye, xs, xe), wt in tiles:
        weight[ys * s:ye * s, xs * s:xe * s] += wt
    for i in range(x.shape[2]):
        acc = None
        for ((ys, ye, xs, xe), wt), state in zip(tiles, states):
            out = vae.decoder(x[:, :, i:i + 1, ys:ye, xs:xe].contiguous(), state).float()
            if acc is None:
                acc = out.new_zeros((*out.shape[:3], h * s, w * s))
            acc[..., ys * s:ye * s, xs * s:xe * s] += out * wt
            del out
        yield acc / weight
