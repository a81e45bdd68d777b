"""Colour correction of generated chunks towards the conditioning image (reference `match_and_blend_colors`).

Per frame: sRGB → CIE Lab (D65, 2° observer; the same formulas and constants as scikit-image's rgb2lab /
lab2rgb, re-implemented in torch so it runs on the GPU and needs no scikit-image), per-channel mean/std
transfer to the reference image's statistics, back to sRGB (clipped), blended with the original by
`strength`. Frames are processed a few at a time so 81 frames of 720p do not need gigabytes of temporaries.
"""
from __future__ import annotations

import torch

from ..errors import InputError

__all__ = ["rgb_to_lab", "lab_to_rgb", "match_and_blend_colors"]

# sRGB (D65) -> XYZ, as in scikit-image; its inverse is taken in float64 like skimage's linalg.inv.
_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423],
                              [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65_2 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)   # skimage's D65 / 2° tristimulus


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], channels last `[..., 3]` → Lab `[..., 3]` (L 0..100), in rgb's floating dtype."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = lin @ _XYZ_FROM_RGB.T.to(device=rgb.device, dtype=rgb.dtype)
    xyz = xyz / _WHITE_D65_2.to(device=rgb.device, dtype=rgb.dtype)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab `[..., 3]` → sRGB clipped to [0, 1]; negative Z is clipped to 0 as in skimage's lab2xyz."""
    L, a, b = lab.unbind(-1)
    fy = (L + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = (fy - b / 200.0).clamp_min(0.0)
    f = torch.stack([fx, fy, fz], dim=-1)
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)
    xyz = xyz * _WHITE_D65_2.to(device=lab.device, dtype=lab.dtype)
    lin = xyz @ _RGB_FROM_XYZ.T.to(device=lab.device, dtype=lab.dtype)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(0.0031308) ** (1 / 2.4) - 0.055, lin * 12.92)
    return rgb.clamp(0.0, 1.0)


def _stats(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame, per-channel mean and population std of `[n, H, W, 3]` (computed in float64)."""
    x = lab.to(torch.float64).flatten(1, 2)
    return x.mean(1), x.std(1, correction=0)


def match_and_blend_colors(video: torch.Tensor, reference: torch.Tensor, strength: float,
                           frames_per_batch: int = 4) -> torch.Tensor:
    """Colour-match `video` `[1, 3, T, H, W]` to `reference` `[1, 3, 1, H, W]` (both in [−1, 1]).

    strength 0 returns the input unchanged; 1 is full correction. Output: same shape, dtype and device.
    Channels whose std is 0 in a frame become the reference mean (as the reference does).
    """
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise InputError("color_correction_strength", f"expected a value between 0 and 1, got {strength}")
    if s == 0.0:
        return video
    if video.dim() != 5 or video.shape[1] != 3 or reference.dim() != 5 or reference.shape[1:3] != (3, 1):
        raise ValueError(f"expected video [1,3,T,H,W] and reference [1,3,1,H,W], got {tuple(video.shape)}, "
                         f"{tuple(reference.shape)}")
    work = torch.float64 if video.dtype == torch.float64 else torch.float32
    ref01 = ((reference[0, :, 0].to(work) + 1.0) / 2.0).clamp(0.0, 1.0).permute(1, 2, 0)   # [H, W, 3]
    ref_mean, ref_std = _stats(rgb_to_lab(ref01)[None])
    out = torch.empty_like(video)
    for t0 in range(0, video.shape[2], frames_per_batch):
        src = ((video[0, :, t0:t0 + frames_per_batch].to(work) + 1.0) / 2.0).clamp(0.0, 1.0)
        src = src.permute(1, 2, 3, 0)                                                     # [n, H, W, 3]
        lab = rgb_to_lab(src)
        mean, std = _stats(lab)
        gain = torch.where(std == 0, torch.zeros_like(std), ref_std / torch.where(std == 0, torch.ones_like(std), std))
        shift = ref_mean - mean * gain                                                     # std 0 -> mean_ref
        corrected = lab * gain[:, None, None, :].to(work) + shift[:, None, None, :].to(work)
        rgb = lab_to_rgb(corrected)
        blended = (1.0 - s) * src + s * rgb
        out[0, :, t0:t0 + frames_per_batch] = (blended * 2.0 - 1.0).permute(3, 0, 1, 2).to(video.dtype)
    return out
