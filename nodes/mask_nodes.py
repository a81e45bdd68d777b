"""MaskFromRegion: which part of the picture belongs to the left and to the right voice, with a preview."""
from __future__ import annotations

from typing import Any

import torch

from infinitetalk.errors import InputError

from . import media

MODES = ("halves", "x_ranges", "boxes", "mask", "speaker_masks")

LEFT_COLOUR = torch.tensor([1.0, 0.15, 0.15])
RIGHT_COLOUR = torch.tensor([0.15, 0.35, 1.0])


def _numbers(text: str, count: int, input_name: str) -> list[float]:
    parts = [p for p in str(text).replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count:
        raise InputError(input_name, f"expected {count} comma-separated numbers, got {text!r}")
    return values


def overlay_preview(image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """IMAGE [1,H,W,3]: left speaker tinted red, right blue, background dimmed."""
    rgb = image[0, ..., :3].float()
    left, right, background = (masks[k][..., None] for k in range(3))
    out = rgb * (1 - 0.5 * left - 0.5 * right) + 0.5 * left * LEFT_COLOUR + 0.5 * right * RIGHT_COLOUR
    out = out * (1 - 0.6 * background)
    return out.clamp(0, 1)[None]


def preview_ui(preview: torch.Tensor) -> dict:
    """The node's own preview image (a temp PNG, shown like core Preview Image's): the templates need no separate
    output node for it, so a graph whose video cannot be made is refused as a whole instead of "succeeding"."""
    path = media.write_png(media.image_uint8(preview, "preview")[0], media.temp_file(".png", "speaker_masks"))
    return {"images": [{"filename": path.name, "subfolder": path.parent.name, "type": "temp"}]}


class MaskFromRegion:
    """Bind each voice to a person: left/right speaker masks, the background, and a coloured preview."""

    DESCRIPTION = ("Makes the speaker masks that bind the left voice to the left person and the right voice to "
                   "the right person. Check the preview: red = left voice, blue = right voice, dimmed = "
                   "background (never lip-synced), shown on the node when it runs. Pixels covered by both "
                   "speakers belong to neither.")
    CATEGORY = "InfiniteTalk"
    SEARCH_ALIASES = ["InfiniteTalk", "speaker mask", "mask from region"]  # the node search also matches these
    FUNCTION = "make"
    RETURN_TYPES = ("MASK", "MASK", "MASK", "IMAGE")
    RETURN_NAMES = ("left_mask", "right_mask", "background", "preview")
    OUTPUT_TOOLTIPS = ("Region of the left speaker (1 = that person).", "Region of the right speaker.",
                       "Everything that is neither speaker.", "The picture with left red, right blue, background dimmed.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The picture (or first video frame) showing the two people."}),
                "mode": (list(MODES), {"default": "halves", "tooltip":
                         "halves: left/right half of the frame inset by 'margin'; x_ranges: vertical strips in "
                         "percent of the width; boxes: pixel boxes x0,y0,x1,y1; mask: one painted MASK split at the "
                         "middle; speaker_masks: one MASK per speaker."}),
                "margin": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 0.45, "step": 0.01, "tooltip":
                           "halves mode: margin kept free around each half, as a fraction (0.05 = the reference's)."}),
                "left_region": ("STRING", {"default": "5,45", "tooltip":
                                "x_ranges mode: 'start,end' percent of the width (e.g. 5,45); boxes mode: "
                                "'x0,y0,x1,y1' in pixels (x = column, y = row) for the LEFT speaker."}),
                "right_region": ("STRING", {"default": "55,95", "tooltip":
                                 "Same as left_region, for the RIGHT speaker (e.g. 55,95)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "mask mode: white where people may move; the left half goes to the "
                                  "left voice, the right half to the right voice. speaker_masks mode: the LEFT speaker."}),
                "right_mask": ("MASK", {"tooltip": "speaker_masks mode: the RIGHT speaker's region."}),
            },
        }

    def make(self, image: torch.Tensor, mode: str, margin: float, left_region: str, right_region: str,
             mask: Any = None, right_mask: Any = None) -> tuple:
        from infinitetalk.pipeline import masks as lib

        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] == 0:
            raise InputError("image", "expected an IMAGE [B,H,W,C]")
        h, w = int(image.shape[1]), int(image.shape[2])
        if mode == "halves":
            masks = lib.default_speaker_masks(h, w, face_scale=float(margin))
        elif mode == "x_ranges":
            masks = lib.masks_from_x_ranges(_numbers(left_region, 2, "left_region"),
                                            _numbers(right_region, 2, "right_region"), h, w)
        elif mode == "boxes":
            masks = lib.masks_from_boxes(_numbers(left_region, 4, "left_region"),
                                         _numbers(right_region, 4, "right_region"), h, w)
        elif mode == "mask":
            if mask is None:
                raise InputError("mask", "mode 'mask' needs a MASK connected to 'mask'")
            masks = lib.masks_from_image(_first(mask), h, w, "mask")
        elif mode == "speaker_masks":
            if mask is None or right_mask is None:
                raise InputError("mask" if mask is None else "right_mask",
                                 "mode 'speaker_masks' needs the left speaker's MASK on 'mask' and the right one's on 'right_mask'")
            masks = lib.masks_from_speaker_masks(_first(mask), _first(right_mask), h, w)
        else:
            raise InputError("mode", f"{mode!r} is not one of {', '.join(MODES)}")
        masks = masks.float().cpu()
        preview = overlay_preview(image.cpu(), masks)
        return {"ui": preview_ui(preview), "result": (masks[0:1], masks[1:2], masks[2:3], preview)}


def _first(mask: Any) -> torch.Tensor:
    t = torch.as_tensor(mask).float()
    return t[0] if t.ndim == 3 else t
