"""Colour matching: golden cases, scikit-image cross-check (optional), edge cases, batching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import golden_cases
from infinitetalk.errors import InputError
from infinitetalk.parity.runner import Case, rel_l2
from infinitetalk.pipeline.color import lab_to_rgb, match_and_blend_colors, rgb_to_lab


@pytest.mark.parametrize("case_dir", golden_cases("color_match"), ids=lambda p: p.name)
def test_color_match_golden(case_dir):
    case = Case.load(case_dir)
    inp = case.inputs()
    out = match_and_blend_colors(inp["video"], inp["reference"], case.call["strength"])
    assert rel_l2(out, case.expected()["video"]) <= case.tolerance


def _skimage_reference(video, reference, strength):
    """The reference algorithm written with scikit-image, frame by frame."""
    color = pytest.importorskip("skimage.color")
    src = np.clip((video[0].permute(1, 2, 3, 0).numpy() + 1) / 2, 0, 1)
    ref_lab = color.rgb2lab(np.clip((reference[0, :, 0].permute(1, 2, 0).numpy() + 1) / 2, 0, 1))
    frames = []
    for f in src:
        lab = color.rgb2lab(f)
        out = lab.copy()
        for j in range(3):
            ms, ss = lab[..., j].mean(), lab[..., j].std()
            mr, sr = ref_lab[..., j].mean(), ref_lab[..., j].std()
            out[..., j] = mr if ss == 0 else (out[..., j] - ms) * (sr / ss) + mr
        with _quiet():
            rgb = np.clip(color.lab2rgb(out), 0, 1)
        frames.append((1 - strength) * f + strength * rgb)
    return torch.from_numpy(np.stack(frames) * 2 - 1).permute(3, 0, 1, 2)[None].float()


class _quiet:
    """Silence skimage's 'negative Z values clipped' warnings."""

    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *a):
        self._w.__exit__(*a)


def test_lab_roundtrip_and_against_skimage():
    color = pytest.importorskip("skimage.color")
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(40, 50, 3, generator=g, dtype=torch.float64)
    rgb[0, :4] = torch.tensor([[0.0, 0, 0], [1, 1, 1], [0.04045, 0.01, 0.5], [0.002, 0.0031308, 1]])
    lab = rgb_to_lab(rgb)
    np.testing.assert_allclose(lab.numpy(), color.rgb2lab(rgb.numpy()), atol=1e-9)
    # not exactly invertible near the thresholds (0.008856 vs 0.2068966³), like skimage
    torch.testing.assert_close(lab_to_rgb(lab), rgb, atol=1e-6, rtol=0)
    # out-of-gamut Lab, including negative Z (b large) which skimage clips to 0, and clipping of RGB
    wild = torch.stack([torch.rand(500, generator=g) * 120 - 10, torch.rand(500, generator=g) * 300 - 150,
                        torch.rand(500, generator=g) * 400 - 150], -1).double()
    with _quiet():
        want = color.lab2rgb(wild.numpy()[None])[0]
    np.testing.assert_allclose(lab_to_rgb(wild).numpy(), want, atol=1e-9)


@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_match_against_skimage_random_video(strength):
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, 5, 24, 20, generator=g) * 2.4 - 1.2          # values outside [-1, 1] get clipped
    video[:, 1, 2] = 0.25                                                  # a flat channel: std 0 -> mean_ref
    reference = torch.rand(1, 3, 1, 24, 20, generator=g) * 2 - 1
    want = _skimage_reference(video, reference, strength)
    got = match_and_blend_colors(video, reference, strength, frames_per_batch=2)
    assert rel_l2(got, want) < 1e-5


def test_flat_channel_takes_reference_mean_and_strength_zero_is_identity():
    video = torch.zeros(1, 3, 2, 8, 8)          # a flat mid-grey frame: every Lab channel has std 0
    ref = torch.rand(1, 3, 1, 8, 8) * 2 - 1
    out = match_and_blend_colors(video, ref, 1.0)
    ref_lab = rgb_to_lab(((ref[0, :, 0] + 1) / 2).permute(1, 2, 0).double())
    out_lab = rgb_to_lab(((out[0, :, 0] + 1) / 2).permute(1, 2, 0).double())
    # the corrected frame is flat at the reference's mean colour (up to the lab2rgb gamut clip)
    assert float(out[0, :, 0].std(dim=(1, 2)).max()) < 1e-6
    assert float((out_lab.mean((0, 1)) - ref_lab.mean((0, 1))).abs().max()) < 2.0
    assert match_and_blend_colors(video, ref, 0.0) is video


def test_batching_dtype_and_bad_strength():
    g = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, 7, 16, 16, generator=g) * 2 - 1
    ref = torch.rand(1, 3, 1, 16, 16, generator=g) * 2 - 1
    a = match_and_blend_colors(video, ref, 0.7, frames_per_batch=1)
    b = match_and_blend_colors(video, ref, 0.7, frames_per_batch=16)
    torch.testing.assert_close(a, b)
    half = match_and_blend_colors(video.bfloat16(), ref.bfloat16(), 0.7)
    assert half.dtype == torch.bfloat16 and half.shape == video.shape
    with pytest.raises(InputError, match="color_correction_strength"):
        match_and_blend_colors(video, ref, 1.5)
