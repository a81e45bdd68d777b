"""Resolution buckets and the resize-to-cover + centre-crop transform (reference `resize_and_centercrop`).

Buckets are keyed by aspect ratio h/w; the source picks the key closest to its own h/w. Images are resized
bilinearly (antialiased, like PIL's BILINEAR the reference uses), masks with nearest; both with the same
geometry, so a mask stays aligned with its image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["ASPECT_RATIO_627", "ASPECT_RATIO_960", "BUCKETS", "select_bucket", "cover_crop_geometry",
           "resize_cover_crop"]

# h/w key -> (height, width); `infinitetalk-480` buckets (about 627² pixels).
ASPECT_RATIO_627: dict[str, tuple[int, int]] = {
    "0.26": (320, 1216), "0.38": (384, 1024), "0.50": (448, 896), "0.67": (512, 768), "0.82": (576, 704),
    "1.00": (640, 640), "1.22": (704, 576), "1.50": (768, 512), "1.86": (832, 448), "2.00": (896, 448),
    "2.50": (960, 384), "2.83": (1088, 384), "3.60": (1152, 320), "3.80": (1216, 320), "4.00": (1280, 320),
}

# `infinitetalk-720` buckets (about 960² pixels).
ASPECT_RATIO_960: dict[str, tuple[int, int]] = {
    "0.22": (448, 2048), "0.29": (512, 1792), "0.36": (576, 1600), "0.45": (640, 1408), "0.55": (704, 1280),
    "0.63": (768, 1216), "0.76": (832, 1088), "0.88": (896, 1024), "1.00": (960, 960), "1.14": (1024, 896),
    "1.31": (1088, 832), "1.50": (1152, 768), "1.58": (1216, 768), "1.82": (1280, 704), "1.91": (1344, 704),
    "2.20": (1408, 640), "2.30": (1472, 640), "2.67": (1536, 576), "2.89": (1664, 576), "3.62": (1856, 512),
    "3.75": (1920, 512),
}

BUCKETS: dict[str, dict[str, tuple[int, int]]] = {"480p": ASPECT_RATIO_627, "720p": ASPECT_RATIO_960}


def select_bucket(src_h: int, src_w: int, resolution: str = "480p", scale: float = 1.0) -> tuple[int, int]:
    """Output (height, width) for a source of src_h × src_w: the bucket whose h/w key is closest.

    scale: test/preview knob, not a quality setting — multiplies the bucket size and snaps each side to a
    multiple of 16 (at least 16), e.g. scale=1/8 turns 640×640 into 80×80 for CPU tests and demos.
    """
    if resolution not in BUCKETS:
        raise InputError("resolution", f"expected one of {', '.join(BUCKETS)}, got {resolution!r}")
    if src_h < 1 or src_w < 1:
        raise InputError("image", f"expected a non-empty image, got {src_h}×{src_w}")
    if not scale > 0:
        raise InputError("scale", f"expected a positive scale, got {scale}")
    table = BUCKETS[resolution]
    ratio = src_h / src_w
    key = min(table, key=lambda k: abs(float(k) - ratio))   # first of equals in ascending key order, as sorted()[0]
    h, w = table[key]
    if scale != 1.0:
        h, w = (max(16, int(round(side * scale / 16)) * 16) for side in (h, w))
    return h, w


def cover_crop_geometry(src_h: int, src_w: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, top, left): resize to cover `size`, then the centre crop offsets.

    resized = ceil(scale·side) with scale = max(th/h, tw/w); offsets = round((resized − target)/2) with
    Python's round (torchvision's center_crop).
    """
    th, tw = size
    scale = max(th / src_h, tw / src_w)
    rh, rw = math.ceil(scale * src_h), math.ceil(scale * src_w)
    return rh, rw, int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))


def resize_cover_crop(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear",
                      layout: str = "hwc") -> torch.Tensor:
    """Resize-to-cover then centre-crop to `size` = (height, width).

    x: `[..., H, W, C]` (layout "hwc", e.g. images `[N,H,W,3]` or `[H,W,3]`) or `[..., C, H, W]` ("chw", e.g.
    masks `[3,H,W]`); uint8 or float. mode "bilinear" (antialiased, for images) or "nearest" (for masks,
    PyTorch's legacy nearest like the reference). Returns the same layout and dtype (uint8 is rounded).
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    if layout not in ("hwc", "chw"):
        raise ValueError(f"layout must be 'hwc' or 'chw', got {layout!r}")
    if x.dim() < 3:
        raise ValueError(f"expected at least 3 dims ({layout}), got shape {tuple(x.shape)}")
    chw = x.movedim(-1, -3) if layout == "hwc" else x
    lead = chw.shape[:-3]
    c, h, w = chw.shape[-3:]
    th, tw = int(size[0]), int(size[1])
    rh, rw, top, left = cover_crop_geometry(h, w, (th, tw))
    flat = chw.reshape(-1, c, h, w)
    work = flat.float() if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16) else flat
    if (rh, rw) != (h, w):
        if mode == "bilinear":
            work = F.interpolate(work, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
        else:
            work = F.interpolate(work, size=(rh, rw), mode="nearest")
    work = work[..., top:top + th, left:left + tw]
    if x.dtype == torch.uint8:
        work = work.round().clamp(0, 255)
    out = work.to(x.dtype).reshape(*lead, c, th, tw)
    return out.movedim(-3, -1).contiguous() if layout == "hwc" else out.contiguous()
