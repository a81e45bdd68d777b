"""Speaker masks: which image region belongs to the left / right speaker (reference §2.7 of the model notes).

Masks are built at SOURCE image resolution as `[3, H, W]` float {0, 1}: row 0 = left speaker (the reference's
person1), row 1 = right speaker (person2), row 2 = background = not(left ∪ right). `to_latent_masks` then
applies the image's resize-to-cover + centre crop (nearest) and the nearest resize to the latent grid.

Rules (documented in docs/media.md):
* an empty speaker mask is an InputError naming the speaker;
* where the two speakers overlap, the overlap belongs to NEITHER speaker (and not to the background); if that
  leaves a speaker empty it is an InputError;
* a speaker mask covering the whole frame is legal: the background is then empty at source resolution, and
  `to_latent_masks` gives it one token (see there) so no class of the DiT's attention map is ever empty;
* masks of another size than the image are resized to it with nearest (stretching, no crop).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..limits import EMPTY_MASK
from ..video.reader import load_image_with_alpha
from .resolution import resize_cover_crop

__all__ = [
    "FACE_SCALE", "single_speaker_masks", "default_speaker_masks", "masks_from_image", "masks_from_speaker_masks",
    "masks_from_x_ranges", "masks_from_boxes", "combine_speaker_masks", "mask_from_array", "to_latent_masks", "check_mask",
]

FACE_SCALE = 0.05   # the reference's margin of the default left/right regions


def single_speaker_masks(h: int, w: int) -> torch.Tensor:
    """One speaker: the reference passes three all-ones masks (unused by the model)."""
    return torch.ones(3, h, w)


def default_speaker_masks(h: int, w: int, face_scale: float = FACE_SCALE) -> torch.Tensor:
    """Reference default for two speakers: left/right halves inset by `face_scale` (rows [5%, 95%) of H)."""
    r0, r1 = int(h * face_scale), int(h * (1 - face_scale))
    half = w // 2
    left = torch.zeros(h, w, dtype=torch.bool)
    right = torch.zeros(h, w, dtype=torch.bool)
    left[r0:r1, int(half * face_scale):int(half * (1 - face_scale))] = True
    right[r0:r1, int(half * face_scale + half):int(half * (1 - face_scale) + half)] = True
    return combine_speaker_masks(left, right)


def mask_from_array(mask: torch.Tensor, h: int, w: int, input_name: str = "mask") -> torch.Tensor:
    """A user mask → bool `[h, w]` (True = may move), resized to h×w with nearest if needed.

    Accepts `[H,W]`, `[1,H,W]`, `[H,W,1|3|4]`; uint8 (0..255) or float (0..1). With 4 channels the alpha is used
    unless it is fully opaque, else the mean of the colour channels. Threshold: > 0.5.
    """
    m = torch.as_tensor(mask)
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() == 3 and m.shape[-1] in (1, 3, 4):
        m = m.float() / 255.0 if m.dtype == torch.uint8 else m.float()
        if m.shape[-1] == 4 and bool((m[..., 3] < 1.0).any()):
            m = m[..., 3]
        else:
            m = m[..., :3].mean(-1) if m.shape[-1] >= 3 else m[..., 0]
    elif m.dim() == 2:
        m = m.float() / 255.0 if m.dtype == torch.uint8 else m.float()
    else:
        raise InputError(input_name, f"expected a grayscale or RGBA mask image, got an array of shape {tuple(m.shape)}")
    if m.numel() == 0:
        raise InputError(input_name, "the mask image is empty")
    if not bool(torch.isfinite(m).all()):
        raise InputError(input_name, "the mask contains NaN or infinite values")
    if tuple(m.shape) != (h, w):
        m = F.interpolate(m[None, None], size=(h, w), mode="nearest")[0, 0]
    return m > 0.5


def combine_speaker_masks(left: torch.Tensor, right: torch.Tensor,
                          names: tuple[str, str] = ("left speaker mask", "right speaker mask")) -> torch.Tensor:
    """Validate two bool `[H, W]` speaker masks and stack `[left, right, background]` as float.

    Overlapping pixels are removed from both speakers (they belong to neither); the background is
    not(left ∪ right) of the masks as given, and may be empty.
    """
    left, right = left.bool(), right.bool()
    for m, name in zip((left, right), names):
        if not bool(m.any()):
            raise InputError(name, "the mask is empty: mark the region where this speaker is (white / opaque)")
    overlap = left & right
    background = ~(left | right)
    if bool(overlap.any()):
        left, right = left & ~overlap, right & ~overlap
        for m, name in zip((left, right), names):
            if not bool(m.any()):
                raise InputError(name, "the two speaker masks overlap completely; each speaker needs an area "
                                       "of its own (overlapping pixels belong to neither speaker)")
    return torch.stack([left, right, background]).float()


def masks_from_speaker_masks(left: torch.Tensor, right: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-speaker mask images (any size; resized with nearest) → `[3, h, w]`."""
    return combine_speaker_masks(mask_from_array(left, h, w, "left speaker mask"),
                                 mask_from_array(right, h, w, "right speaker mask"))


def masks_from_image(mask: torch.Tensor, h: int, w: int, input_name: str = "mask image") -> torch.Tensor:
    """One mask image for both speakers: left speaker = mask ∩ left half of the frame, right = mask ∩ right half."""
    m = mask_from_array(mask, h, w, input_name)
    if not bool(m.any()):
        raise InputError(input_name, "the mask is empty: paint the speakers' regions white (or opaque)")
    half = w // 2
    left = torch.zeros_like(m)
    right = torch.zeros_like(m)
    left[:, :half] = m[:, :half]
    right[:, half:] = m[:, half:]
    return combine_speaker_masks(left, right, (f"{input_name} (left half)", f"{input_name} (right half)"))


def masks_from_x_ranges(left: Sequence[float], right: Sequence[float], h: int, w: int) -> torch.Tensor:
    """Full-height vertical strips given as percent of the width, e.g. left=(0, 50), right=(50, 100)."""
    strips = []
    for rng, name in ((left, "left speaker x-range"), (right, "right speaker x-range")):
        if len(rng) != 2:
            raise InputError(name, f"expected (start %, end %), got {rng!r}")
        x0, x1 = float(rng[0]), float(rng[1])
        if not (0.0 <= x0 < x1 <= 100.0):
            raise InputError(name, f"expected 0 <= start < end <= 100 (percent of the width), got ({x0}, {x1})")
        c0, c1 = int(round(x0 / 100 * w)), int(round(x1 / 100 * w))
        m = torch.zeros(h, w, dtype=torch.bool)
        m[:, c0:max(c1, c0 + 1)] = True
        strips.append(m)
    return combine_speaker_masks(*strips, names=("left speaker x-range", "right speaker x-range"))


def masks_from_boxes(left: Sequence[float], right: Sequence[float], h: int, w: int) -> torch.Tensor:
    """Pixel boxes (x0, y0, x1, y1) in the usual x = column, y = row convention, end exclusive, clipped to the image.

    (The reference's JSON bbox is [row0, col0, row1, col1]; convert with (b[1], b[0], b[3], b[2]).)
    """
    boxes = []
    for box, name in ((left, "left speaker box"), (right, "right speaker box")):
        if len(box) != 4:
            raise InputError(name, f"expected (x0, y0, x1, y1) in pixels, got {box!r}")
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        x0, x1 = max(0, x0), min(w, x1)
        y0, y1 = max(0, y0), min(h, y1)
        if x1 <= x0 or y1 <= y0:
            raise InputError(name, f"expected x0 < x1 and y0 < y1 inside the {w}×{h} image, got {tuple(box)}")
        m = torch.zeros(h, w, dtype=torch.bool)
        m[y0:y1, x0:x1] = True
        boxes.append(m)
    return combine_speaker_masks(*boxes, names=("left speaker box", "right speaker box"))


def _nearest_index(n_in: int, n_out: int) -> torch.Tensor:
    """Source indices PyTorch's legacy nearest picks when resizing n_in → n_out."""
    return (torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)).floor().long().clamp(max=n_in - 1)


def to_latent_masks(masks: torch.Tensor, lat_h: int, lat_w: int, size: tuple[int, int] | None = None,
                    patch: int = 2) -> torch.Tensor:
    """Source-resolution masks `[3, H, W]` → latent masks `[3, lat_h, lat_w]` float {0, 1}.

    Same path as the reference: resize-to-cover + centre crop to the pixel size `size` (default lat·8) with
    nearest, nearest resize to the latent grid, > 0. Then a guard the reference lacks: the DiT resizes the
    latent masks again (nearest) to its token grid (lat/patch) and averages attention over each class, so
    an empty class would divide by zero. A speaker class that no token hits gets the token it covers most
    (or InputError if the crop cut it off entirely); an empty background (speaker masks covering the whole
    frame) gets the one token least covered by the speakers (taken from them).
    """
    if masks.dim() != 3 or masks.shape[0] != 3:
        raise ValueError(f"expected masks [3, H, W], got {tuple(masks.shape)}")
    size = size or (lat_h * 8, lat_w * 8)
    pix = resize_cover_crop(masks.float(), size, mode="nearest", layout="chw")
    lat = (F.interpolate(pix[None], size=(lat_h, lat_w), mode="nearest")[0] > 0).float()
    if bool((masks > 0).all()):          # single speaker: all-ones, nothing to guard
        return lat
    th, tw = max(1, lat_h // patch), max(1, lat_w // patch)
    rows, cols = _nearest_index(lat_h, th), _nearest_index(lat_w, tw)
    sampled = lat[:, rows][:, :, cols]                                   # what the DiT's nearest resize sees
    coverage = F.adaptive_avg_pool2d(pix[None].float(), (th, tw))[0]    # area of each class per token
    names = ("left speaker mask", "right speaker mask")
    for k in (0, 1):
        if bool(sampled[k].any()):
            continue
        if not bool(pix[k].any()):
            raise InputError(names[k], "the speaker's region lies outside the centre-cropped frame")
        flat = int(torch.argmax(coverage[k]))
        i, j = rows[flat // tw], cols[flat % tw]
        lat[:, i, j] = 0.0
        lat[k, i, j] = 1.0
        sampled = lat[:, rows][:, :, cols]
    if not bool(sampled[2].any()):
        order = torch.argsort(coverage[0] + coverage[1]).flatten().tolist()
        for flat in order:
            i, j = rows[flat // tw], cols[flat % tw]
            owners = [k for k in (0, 1) if lat[k, i, j] > 0]
            if all(int(sampled[k].sum()) > 1 for k in owners):
                lat[:, i, j] = 0.0
                lat[2, i, j] = 1.0
                break
    return lat


_MASK_STRIP_PIXELS = 1 << 20   # mask pixels thresholded at a time: the float copy stays ~12 MB at any size


def check_mask(path: str | os.PathLike, field: str = "mask_image") -> None:
    """Refuse a mask image that marks nothing (all black / fully transparent): the job would "succeed" with
    nothing moving. Probed first (so decoding stays within MAX_PIXELS), then one frame is decoded and
    thresholded strip by strip with the pipeline's rule (`mask_from_array`), so a 40 MP mask is never
    held as float. A mask marking everything is valid (everything is generated). InputError(field, EMPTY_MASK)."""
    rgb, alpha = load_image_with_alpha(path, field)    # alpha only when not fully opaque: it then marks the region
    plane = rgb if alpha is None else alpha
    del rgb, alpha                                     # only the plane that decides stays in memory
    height, width = int(plane.shape[0]), int(plane.shape[1])
    step = max(2, _MASK_STRIP_PIXELS // width)
    top = 0
    while top < height:
        end = height if height - top < 2 * step else top + step    # the last strip takes the rest (never 1 row)
        strip = plane[top:end]
        if bool(mask_from_array(strip, end - top, width, field).any()):
            return
        top = end
    raise InputError(field, EMPTY_MASK)
