"""Every user input of a job read and checked before any model work: audio placement, the picture
(image or video) at the output size, speaker masks, the keep mask, the window plan.

Anything unusable is an InputError naming the input, raised here, so a bad job fails in well under a
second and leaves nothing behind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import torch
import torch.nn.functional as F

from ..audio.io import load_audio, probe_audio
from ..audio.placement import place_speakers
from ..audio.stereo import place_stereo
from ..errors import InputError, require_writable_folder
from ..limits import EMPTY_MASK
from ..video.reader import VideoSource, load_image, load_image_with_alpha, probe_image, probe_video
from ..video.writer import check_audio_encodes
from .job import default_job_dir
from .masks import default_speaker_masks, mask_from_array, masks_from_image, masks_from_speaker_masks, to_latent_masks
from .resolution import resize_cover_crop, select_bucket
from .windows import ChunkPlan, plan_chunks

if TYPE_CHECKING:
    from .request import GenerationRequest

__all__ = ["PreparedInputs", "ReferenceSource", "prepare_inputs", "probe_request_media", "load_mask"]


class ReferenceSource:
    """The picture the video is made from, at the output size: a still image (same frame every window)
    or a video read at 25 fps (ping-ponged when shorter than the audio)."""

    def __init__(self, size: tuple[int, int], image: torch.Tensor | None = None, video=None):
        self.size = size
        self._image = None if image is None else resize_cover_crop(image, size)
        self._video = video
        self.is_still = video is None

    def close(self) -> None:
        if self._video is not None:
            self._video.close()

    def frame(self, index: int) -> torch.Tensor:
        """uint8 `[H, W, 3]` of output frame `index`."""
        if self.is_still:
            return self._image
        return resize_cover_crop(_as_hwc(self._video.frame_at(int(index))), self.size)

    def frames(self, start: int, count: int) -> torch.Tensor:
        """uint8 `[count, H, W, 3]` of output frames [start, start + count)."""
        if self.is_still:
            return self._image[None].expand(count, -1, -1, -1).contiguous()
        frames = torch.stack([_as_hwc(f) for f in self._video.frames(int(start), int(count))])
        return resize_cover_crop(frames, self.size)


@dataclass
class PreparedInputs:
    size: tuple[int, int]                       # output (height, width)
    plan: ChunkPlan
    speaker_tracks: list[torch.Tensor]          # per speaker, mono 16 kHz (listener silent while the other speaks)
    mix: tuple                                  # (samples [C, T] numpy float32, sample rate): the muxed audio
    source: ReferenceSource
    latent_speaker_masks: torch.Tensor          # [3, h, w]: left, right, background
    latent_keep_mask: torch.Tensor | None       # [1, 1, h, w]: 1 = generate, 0 = keep the source; None = all generated
    pixel_keep_weight: torch.Tensor | None = None  # [1, 1, H, W] in [0, 1]: weight of the generated pixels (soft edge)


def _as_hwc(x) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype != torch.uint8:
        raise InputError("image", f"expected uint8 frames, got {t.dtype}")
    return t


def _load_source(req) -> tuple[torch.Tensor, object | None, str]:
    """(first frame uint8 [H, W, 3] at source size, VideoSource or None, input name)."""
    if req.image is not None:
        return _as_hwc(load_image(req.image, "image")), None, "image"
    video = VideoSource(req.video, "video")
    return _as_hwc(video.frame_at(0)), video, "video"


def load_mask(path: Path, name: str) -> torch.Tensor:
    """uint8 `[H, W, 3]`, or `[H, W, 4]` when the file has transparency (the alpha then marks the region)."""
    rgb, alpha = load_image_with_alpha(path, name)
    return rgb if alpha is None else torch.cat([rgb, alpha[..., None]], dim=-1)


def _speaker_masks(req, src_h: int, src_w: int) -> torch.Tensor:
    if req.left_mask is not None:
        return masks_from_speaker_masks(load_mask(req.left_mask, "left_mask"),
                                        load_mask(req.right_mask, "right_mask"), src_h, src_w)
    if req.mask_image is not None:
        return masks_from_image(load_mask(req.mask_image, "mask_image"), src_h, src_w, "mask_image")
    return default_speaker_masks(src_h, src_w)


def _keep_masks(req, src_h: int, src_w: int, size: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """From the mask image: the latent generate-mask `[1, 1, h, w]` (a latent cell is generated when any of its
    pixels may move) and the pixel weight `[1, 1, H, W]` of generated pixels after decoding: 1 on the mask,
    ramping to 0 within about one latent cell outside it (the seam lies outside the user's mask)."""
    if req.mask_image is None:
        return None, None
    m = mask_from_array(load_mask(req.mask_image, "mask_image"), src_h, src_w, "mask_image")
    if not bool(m.any()):   # every path (CLI, nodes, API graph) ends here: an empty mask would move nothing
        raise InputError("mask_image", EMPTY_MASK)
    pix = resize_cover_crop(m[None].float(), size, mode="nearest", layout="chw")[None]   # [1, 1, H, W]
    lat = F.max_pool2d(pix, kernel_size=8)                                                # [1, 1, h, w]
    if not bool((lat > 0).any()):
        raise InputError("mask_image", "the mask's white region lies outside the centre-cropped output frame: "
                                       "nothing would move")
    if bool((lat > 0).all()):
        return None, None   # the mask covers the whole frame: nothing to keep
    ramp = F.interpolate(lat, size=size, mode="bilinear", align_corners=False)
    return lat, torch.maximum(pix, ramp)


def probe_request_media(req: GenerationRequest) -> None:
    """Header checks of every media file of a request (each reader's `probe_*`, against `infinitetalk.limits`)
    before any of them is decoded, so an over-limit picture fails in milliseconds even when it is read last."""
    for field in ("stereo_audio", "left_audio", "right_audio"):
        if getattr(req, field, None) is not None:
            probe_audio(getattr(req, field), field)
    if req.image is not None:
        probe_image(req.image, "image")
    elif req.video is not None:
        probe_video(req.video, "video")
    for field in ("mask_image", "left_mask", "right_mask"):
        if getattr(req, field, None) is not None:
            probe_image(getattr(req, field), field)


def _check_output_folders(req) -> None:
    """The output's folder and the job folder's parent must be writable (not found out after the sampling)."""
    require_writable_folder(Path(req.out).parent, "out")
    require_writable_folder(Path(req.job_dir).parent if req.job_dir else default_job_dir(req.out).parent, "job_dir")


def prepare_inputs(req: GenerationRequest) -> PreparedInputs:
    """Read and check every input of a resolved request (see module docstring)."""
    probe_request_media(req)
    _check_output_folders(req)
    if req.stereo_audio is not None:   # one conversation file: left channel = left person, right = right
        placement = place_stereo(load_audio(req.stereo_audio, "stereo_audio"), "stereo_audio")
    else:
        left = load_audio(req.left_audio, "left_audio")
        right = load_audio(req.right_audio, "right_audio")
        placement = place_speakers(left, right, req.order)
    check_audio_encodes(int(placement.mix.sample_rate), int(placement.mix.samples.shape[0]), "audio")
    plan = plan_chunks(placement.frames, req.frame_num, req.motion_frames)

    first, video, _ = _load_source(req)
    try:   # the video stays open for the sampling: closed here only when a later check fails
        src_h, src_w = int(first.shape[0]), int(first.shape[1])
        size = select_bucket(src_h, src_w, req.resolution, scale=req.size_scale)
        h, w = size[0] // 8, size[1] // 8
        speakers = to_latent_masks(_speaker_masks(req, src_h, src_w), h, w, size=size)
        keep, keep_pixels = _keep_masks(req, src_h, src_w, size)
        source = ReferenceSource(size, image=first if video is None else None, video=video)
    except BaseException:
        if video is not None:
            video.close()
        raise
    mix = placement.mix
    return PreparedInputs(size=size, plan=plan, speaker_tracks=placement.tracks,
                          mix=(mix.samples.numpy(), int(mix.sample_rate)), source=source,
                          latent_speaker_masks=speakers, latent_keep_mask=keep, pixel_keep_weight=keep_pixels)
