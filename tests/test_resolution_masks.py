"""Resolution buckets, resize-to-cover + centre crop, speaker masks and their latent form."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infinitetalk.errors import InputError
from infinitetalk.pipeline.masks import (default_speaker_masks, mask_from_array, masks_from_boxes, masks_from_image,
                                         masks_from_speaker_masks, masks_from_x_ranges, single_speaker_masks,
                                         to_latent_masks)
from infinitetalk.pipeline.resolution import (ASPECT_RATIO_627, ASPECT_RATIO_960, cover_crop_geometry,
                                              resize_cover_crop, select_bucket)


def test_bucket_tables_are_the_reference_tables():
    assert len(ASPECT_RATIO_627) == 15 and len(ASPECT_RATIO_960) == 21
    for table in (ASPECT_RATIO_627, ASPECT_RATIO_960):
        for key, (h, w) in table.items():
            assert h % 64 == 0 and w % 64 == 0
            assert abs(h / w - float(key)) < 0.2      # keys are h/w
    assert ASPECT_RATIO_627["1.00"] == (640, 640) and ASPECT_RATIO_960["1.00"] == (960, 960)


@pytest.mark.parametrize("src,res,want", [
    ((720, 1280), "480p", (448, 896)),      # 0.5625 -> key 0.50
    ((1280, 720), "480p", (832, 448)),      # 1.78 -> 1.86
    ((1000, 1000), "720p", (960, 960)),
    ((1080, 1920), "720p", (704, 1280)),    # 0.5625 -> 0.55
    ((600, 800), "480p", (576, 704)),       # 0.75 -> 0.82 (|0.07|) beats 0.67 (|0.08|)
])
def test_select_bucket(src, res, want):
    assert select_bucket(*src, resolution=res) == want


def test_select_bucket_scale_and_errors():
    assert select_bucket(512, 512, "480p", scale=1 / 8) == (80, 80)
    h, w = select_bucket(720, 1280, "480p", scale=0.1)
    assert h % 16 == 0 and w % 16 == 0 and (h, w) == (48, 96)
    with pytest.raises(InputError, match="resolution"):
        select_bucket(10, 10, "1080p")
    with pytest.raises(InputError, match="scale"):
        select_bucket(100, 100, scale=0)


def test_cover_crop_geometry_matches_reference_arithmetic():
    # scale = max(th/h, tw/w), resized = ceil(scale·side), crop offsets = round((resized − target)/2)
    assert cover_crop_geometry(720, 1280, (448, 896)) == (504, 896, 28, 0)
    assert cover_crop_geometry(100, 300, (48, 96)) == (48, 144, 0, 24)
    rh, rw, top, left = cover_crop_geometry(333, 517, (320, 1216))
    assert rw == 1216 and rh == 784 and top == 232 and left == 0


def test_resize_cover_crop_layouts_and_dtypes():
    img = torch.randint(0, 256, (2, 100, 300, 3), dtype=torch.uint8)
    out = resize_cover_crop(img, (48, 96))
    assert out.shape == (2, 48, 96, 3) and out.dtype == torch.uint8
    assert resize_cover_crop(img[0].float() / 255, (48, 96)).dtype == torch.float32
    # a nearest-resized mask stays aligned with the image: a marker column lands in the same place
    marker = torch.zeros(100, 300, 3, dtype=torch.uint8)
    marker[:, 150:180] = 255
    mask = (marker[..., 0] > 0).float()[None].expand(3, -1, -1)
    img_out = resize_cover_crop(marker, (48, 96))[..., 0] > 127
    mask_out = resize_cover_crop(mask, (48, 96), mode="nearest", layout="chw")[0] > 0
    assert (img_out ^ mask_out).float().mean() < 0.03
    assert set(mask_out.unique().tolist()) <= {False, True}


def test_bilinear_matches_pil_within_one_level():
    Image = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(90, 170, 3, generator=g) * 255).round().to(torch.uint8)
    rh, rw, top, left = cover_crop_geometry(90, 170, (64, 64))
    pil = np.array(Image.fromarray(x.numpy()).resize((rw, rh), Image.BILINEAR))[top:top + 64, left:left + 64]
    diff = np.abs(pil.astype(int) - resize_cover_crop(x, (64, 64)).numpy().astype(int))
    assert diff.max() <= 1


def test_default_masks_are_reference_regions():
    m = default_speaker_masks(200, 300)
    assert m.shape == (3, 200, 300)
    rows = m[0].any(1).nonzero().flatten()
    cols_l, cols_r = m[0].any(0).nonzero().flatten(), m[1].any(0).nonzero().flatten()
    assert (rows.min(), rows.max()) == (10, 189)                       # [0.05H, 0.95H)
    assert (cols_l.min(), cols_l.max()) == (7, 141)                    # [0.05·W/2, 0.95·W/2)
    assert (cols_r.min(), cols_r.max()) == (157, 291)                  # W/2 + same
    assert torch.equal(m[2], 1 - m[0] - m[1])
    assert torch.equal(single_speaker_masks(4, 5), torch.ones(3, 4, 5))


def test_mask_image_split_into_halves_and_alpha():
    img = torch.zeros(40, 60, 3, dtype=torch.uint8)
    img[5:30, 5:20] = 255
    img[10:35, 40:55] = 255
    m = masks_from_image(img, 40, 60)
    assert int(m[0].sum()) == 25 * 15 and int(m[1].sum()) == 25 * 15
    assert m[0, :, 30:].sum() == 0 and m[1, :, :30].sum() == 0
    rgba = torch.zeros(40, 60, 4, dtype=torch.uint8)
    rgba[..., :3] = 255                                                 # colour says nothing, alpha marks regions
    rgba[0:10, 0:10, 3] = 255
    rgba[0:10, 50:60, 3] = 255
    m = masks_from_image(rgba, 40, 60)
    assert int(m[0].sum()) == 100 and int(m[1].sum()) == 100
    # a smaller mask is resized to the image with nearest
    assert masks_from_image(img[::2, ::2], 40, 60).shape == (3, 40, 60)
    only_left = img.clone()
    only_left[:, 30:] = 0
    with pytest.raises(InputError, match="right half"):
        masks_from_image(only_left, 40, 60)
    with pytest.raises(InputError, match="mask image"):
        masks_from_image(torch.zeros(40, 60), 40, 60)
    with pytest.raises(InputError, match="mask"):
        mask_from_array(torch.zeros(2, 3, 4, 5), 40, 60)


def test_boxes_use_x_y_convention_and_x_ranges():
    m = masks_from_boxes((10, 2, 20, 8), (30, 0, 40, 10), h=12, w=50)
    assert int(m[0].sum()) == 10 * 6 and bool(m[0, 2:8, 10:20].all())    # rows = y, cols = x
    assert bool(m[1, :10, 30:40].all()) and m[2, 11, 45] == 1
    with pytest.raises(InputError, match="left speaker box"):
        masks_from_boxes((5, 5, 5, 9), (0, 0, 3, 3), 12, 50)
    with pytest.raises(InputError, match="right speaker box"):
        masks_from_boxes((0, 0, 3, 3), (60, 0, 70, 5), 12, 50)            # entirely outside the image
    s = masks_from_x_ranges((0, 50), (50, 100), 10, 40)
    assert torch.equal(s[0, :, :20], torch.ones(10, 20)) and s[2].sum() == 0   # full frame: background empty
    with pytest.raises(InputError, match="left speaker x-range"):
        masks_from_x_ranges((60, 50), (0, 10), 10, 40)


def test_overlap_belongs_to_neither_and_full_overlap_is_an_error():
    left = torch.zeros(10, 10)
    right = torch.zeros(10, 10)
    left[:, :6] = 1
    right[:, 4:] = 1
    m = masks_from_speaker_masks(left, right, 10, 10)
    assert m[0, :, 4:6].sum() == 0 and m[1, :, 4:6].sum() == 0 and m[2].sum() == 0
    assert int(m[0].sum()) == 40 and int(m[1].sum()) == 40
    with pytest.raises(InputError, match="overlap"):
        masks_from_speaker_masks(left, left, 10, 10)
    with pytest.raises(InputError, match="left speaker mask"):
        masks_from_speaker_masks(torch.zeros(10, 10), right, 10, 10)


def _token_view(lat):
    """What the DiT sees: nearest resize of the latent masks to the token grid (patch 2)."""
    return F.interpolate(lat[None], size=(lat.shape[1] // 2, lat.shape[2] // 2), mode="nearest")[0] > 0


def test_to_latent_masks_reference_path():
    m = default_speaker_masks(480, 854)
    lat = to_latent_masks(m, 56, 112, size=(448, 896))
    pix = resize_cover_crop(m, (448, 896), mode="nearest", layout="chw")
    want = (F.interpolate(pix[None], size=(56, 112), mode="nearest")[0] > 0).float()
    assert torch.equal(lat, want)
    assert torch.equal(to_latent_masks(torch.ones(3, 30, 40), 4, 6), torch.ones(3, 4, 6))


def test_to_latent_masks_never_leaves_a_class_empty():
    # full-frame speakers: background gets one token; every class non-empty on the token grid
    full = masks_from_x_ranges((0, 50), (50, 100), 64, 96)
    lat = to_latent_masks(full, 8, 12)
    tok = _token_view(lat)
    assert all(bool(tok[k].any()) for k in range(3)) and int(tok[2].sum()) == 1
    assert bool((lat.sum(0) == 1).all())
    # a tiny speaker that nearest resizing would miss still gets a token
    tiny = masks_from_boxes((1, 1, 3, 3), (40, 10, 90, 60), 64, 96)
    tok = _token_view(to_latent_masks(tiny, 8, 12))
    assert bool(tok[0].any()) and bool(tok[1].any()) and bool(tok[2].any())
    # a speaker cut off by the centre crop is an input error, not a crash
    wide = masks_from_boxes((0, 0, 4, 10), (40, 0, 60, 10), 10, 100)
    with pytest.raises(InputError, match="left speaker"):
        to_latent_masks(wide, 4, 4)
