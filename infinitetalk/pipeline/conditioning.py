"""Per-window conditioning tensors of the reference loop: y (first-frame mask + reference latents), CLIP
features, motion latents, and the pixel <-> model conversions around them."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..models.vae import WanVAE

__all__ = ["to_model_frames", "to_uint8_frames", "first_frame_mask", "reference_condition", "motion_latents"]


def to_model_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 `[H, W, 3]` -> `[3, H, W]`, or `[T, H, W, 3]` -> `[3, T, H, W]`, float32 in [−1, 1]."""
    x = frames.float().div(127.5).sub(1.0)
    return x.permute(2, 0, 1) if x.dim() == 3 else x.permute(3, 0, 1, 2)


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """`[3, T, H, W]` in [−1, 1] -> uint8 `[T, H, W, 3]` (the reference's `(x+1)/2·255`, rounded)."""
    x = ((video.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous()


def first_frame_mask(latent_frames: int, h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 4 mask channels of y: `[4, T, h, w]`, 1 on latent frame 0 (the reference frame), 0 elsewhere.

    The reference builds it per video frame (frame 0 repeated 4×, then 80 frames, regrouped by 4), which
    leaves all four channels of latent 0 at 1 and every later latent at 0.
    """
    m = torch.zeros(4, latent_frames, h, w, device=device)
    m[:, 0] = 1.0
    return m


@torch.no_grad()
def reference_condition(vae: WanVAE, reference: torch.Tensor, frame_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y `[20, T, h, w]` from VAE.encode([reference, zeros × (frame_num − 1)]) and the clean reference
    latent `[16, 1, h, w]` (the first window's motion latent; the encoder is causal, so it equals
    encoding the reference alone)."""
    _, hgt, wid = reference.shape
    video = torch.zeros(3, frame_num, hgt, wid, dtype=reference.dtype, device=reference.device)
    video[:, 0] = reference
    lat = vae.encode(video)
    mask = first_frame_mask(lat.shape[1], lat.shape[2], lat.shape[3], device=lat.device)
    return torch.cat([mask, lat], dim=0), lat[:, :1].clone()


@torch.no_grad()
def motion_latents(vae: WanVAE, tail: torch.Tensor) -> torch.Tensor:
    """Latents `[16, n, h, w]` of the previous window's last frames `[3, 4n−3, H, W]` (after colour match)."""
    return vae.encode(tail)
