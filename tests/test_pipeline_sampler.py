"""Guidance arithmetic, motion clamping, keep region and per-window noise of the window sampler."""
from __future__ import annotations

import torch

from infinitetalk.pipeline.sampler import Guidance, KeepRegion, WindowConditioning, sample_window, window_noise
from infinitetalk.pipeline.schedule import timesteps


class RecordingDiT:
    """A fake DiT whose velocity depends on every input, so each guidance term is distinguishable."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, clip_fea, y, audio, ref_target_masks):
        self.calls.append({"context": context.clone(), "audio": audio.clone(), "t": float(t)})
        return (0.1 * x + context.mean() + 0.3 * audio.mean() * audio.shape[0] + 0.01 * t / 1000
                + 0.05 * y[4:].mean() + 0.02 * clip_fea.mean()).expand_as(x).clone()


def _cond(h=4, w=6, t_lat=3):
    g = torch.Generator().manual_seed(0)
    return WindowConditioning(
        context=torch.randn(5, 8, generator=g), context_null=torch.randn(7, 8, generator=g) + 1.0,
        clip_fea=torch.randn(1, 257, 4, generator=g), y=torch.randn(20, t_lat, h, w, generator=g),
        audio=torch.rand(2, 4 * (t_lat - 1) + 1, 5, 3, 4, generator=g) + 0.5,
        ref_target_masks=torch.ones(3, h, w))


def _v(cond, x, t, context, audio):
    return RecordingDiT()(x, t, context, cond.clip_fea, cond.y, audio, cond.ref_target_masks)


def test_quality_guidance_three_calls_formula_and_single_silent_person():
    cond = _cond()
    dit = RecordingDiT()
    noise = torch.randn(16, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    times = timesteps(1, 7.0)
    motion = torch.zeros(16, 1, 4, 6)
    out = sample_window(dit, noise, cond, times, Guidance(5.0, 4.0), motion)
    assert len(dit.calls) == 3
    # the uncond pass sees the negative prompt and ONE zero-audio person
    audios = [c["audio"] for c in dit.calls]
    assert [a.shape[0] for a in audios] == [2, 2, 1]
    assert float(audios[2].abs().sum()) == 0.0
    assert torch.equal(dit.calls[1]["context"], cond.context_null)
    x = noise.clone()
    x[:, :1] = motion
    t = times[:1]
    cond_v = _v(cond, x, t, cond.context, cond.audio)
    drop_text = _v(cond, x, t, cond.context_null, cond.audio)
    uncond = _v(cond, x, t, cond.context_null, cond.silent_audio)
    v = uncond + 5.0 * (cond_v - drop_text) + 4.0 * (drop_text - uncond)
    expected = x - v * (float(times[0]) - float(times[1])) / 1000
    expected[:, :1] = motion
    torch.testing.assert_close(out, expected)


def test_fast_guidance_two_calls():
    cond = _cond()
    dit = RecordingDiT()
    noise = torch.randn(16, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    times = timesteps(2, 2.0)
    g = Guidance(1.0, 2.0)
    assert g.calls_per_step == 2
    sample_window(dit, noise, cond, times, g, torch.zeros(16, 1, 4, 6))
    assert len(dit.calls) == 4
    assert [c["audio"].shape[0] for c in dit.calls] == [2, 1, 2, 1]
    assert all(torch.equal(c["context"], cond.context) for c in dit.calls)
    x = noise.clone()
    x[:, :1] = 0
    c_v = _v(cond, x, times[:1], cond.context, cond.audio)
    d_v = _v(cond, x, times[:1], cond.context, cond.silent_audio)
    v = d_v + 2.0 * (c_v - d_v)
    one = x - v * (float(times[0]) - float(times[1])) / 1000
    one[:, :1] = 0
    dit2 = RecordingDiT()
    out1 = sample_window(dit2, noise, cond, times[:2], g, torch.zeros(16, 1, 4, 6))
    torch.testing.assert_close(out1, one)


def test_motion_latents_clamped_clean_every_step_and_model_sees_them():
    cond = _cond()
    seen = []

    def dit(x, t, *rest):
        seen.append(x[:, :3].clone())
        return torch.randn_like(x)

    motion = torch.full((16, 3, 4, 6), 0.25)
    out = sample_window(dit, torch.randn(16, 3, 4, 6), cond, timesteps(3, 5.0), Guidance(5.0, 4.0), motion)
    assert all(torch.equal(s, motion) for s in seen)
    assert torch.equal(out[:, :3], motion)


def test_keep_region_ends_exactly_at_source_outside_mask():
    cond = _cond(t_lat=4)
    src = torch.randn(16, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 4, 6)
    mask[..., 1:3, 2:5] = 1.0
    noise = torch.randn(16, 4, 4, 6, generator=torch.Generator().manual_seed(4))
    motion = src[:, :1].clone()

    def dit(x, t, *rest):
        return torch.randn_like(x) * 3

    out = sample_window(dit, noise, cond, timesteps(4, 7.0), Guidance(5.0, 4.0), motion,
                        keep=KeepRegion(latents=src, mask=mask))
    outside = (mask == 0).expand_as(out)
    torch.testing.assert_close(out[outside], src[outside])
    assert not torch.allclose(out[:, 1:, 1:3, 2:5], src[:, 1:, 1:3, 2:5])


def test_window_noise_is_reproducible_per_window_and_differs_between_windows():
    a = window_noise(42, 0, (16, 3, 2, 2), "cpu")
    assert torch.equal(a, window_noise(42, 0, (16, 3, 2, 2), "cpu"))
    assert not torch.equal(a, window_noise(42, 1, (16, 3, 2, 2), "cpu"))
    assert not torch.equal(a, window_noise(43, 0, (16, 3, 2, 2), "cpu"))
