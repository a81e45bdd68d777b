"""Guidance arithmetic, motion clamping, keep region and per-window noise of the window sampler."""
from __future__ import annotations

import torch

import pytest

from _dit_testutil import random_inputs, random_model, small_config
from infinitetalk.pipeline.sampler import (Guidance, KeepRegion, WindowConditioning, guided_velocity, sample_window,
                                           window_noise)
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


def _tiny_dit_cond(persons: int):
    cfg = small_config(dim=64, num_heads=4, num_layers=2)
    i = random_inputs(cfg, persons=persons, frames=3, h=6, w=8)
    null = torch.randn(8, cfg.text_dim, generator=torch.Generator().manual_seed(7))
    cond = WindowConditioning(context=i["context"], context_null=null, clip_fea=i["clip_fea"], y=i["y"],
                              audio=i["audio"], ref_target_masks=i["ref_target_masks"])
    return random_model(cfg), cond, i["x"]


@pytest.mark.parametrize("guidance", [Guidance(5.0, 4.0), Guidance(1.0, 2.5)], ids=["quality", "fast"])
def test_batched_guidance_equals_sequential_calls(guidance):
    for persons in (1, 2):
        dit, cond, x = _tiny_dit_cond(persons)
        t = torch.tensor([800.0])
        with torch.inference_mode():
            sequential = guided_velocity(dit, x, t, cond, guidance, batch=1)
            batched = guided_velocity(dit, x, t, cond, guidance, batch=True)
            pairs = guided_velocity(dit, x, t, cond, guidance, batch=2)
        for got in (batched, pairs):
            err = float((got.double() - sequential.double()).norm() / sequential.double().norm())
            assert err <= 1e-6, err
    with pytest.raises(ValueError, match="batch"):
        guided_velocity(dit, x, t, cond, guidance, batch=0)


def _constant_decisions(retention: bool, steps: int) -> list[bool]:
    """Branch 0's decisions when the modulated input never changes (relative change 0 every step)."""
    from infinitetalk.pipeline.teacache import TeaCache

    cache = TeaCache(threshold=0.2, scale="480", retention_steps=retention)
    cache.start_window(steps)
    e = torch.ones(1, 6, 4)
    return [cache.decide(step, 0, e) for step in range(steps)]


def test_teacache_decisions_follow_the_reference_rule_by_hand():
    # no retention steps: 480p polynomial at 0 is −0.2020 < 0.2, so every middle step is skipped; the first
    # step and the last (cutoff) step always run
    assert _constant_decisions(False, 6) == [True, False, False, False, False, True]
    # retention steps: 5 steps always run; then +0.1325 per step: 0.1325 < 0.2 skip, 0.2650 run (reset), ...
    assert _constant_decisions(True, 9) == [True] * 5 + [False, True, False, True]


def _reference_counter_rule(modulated: list[torch.Tensor], steps: int, thresh: float, retention: bool) -> list[bool]:
    """An independent transcription of the reference's call-counter formulation (cnt over 3 calls per step,
    np.poly1d rescale) for one branch, used to check TeaCache's bookkeeping on real time embeddings."""
    import numpy as np

    from infinitetalk.pipeline.teacache import TEACACHE_COEFFICIENTS

    ret_calls, cutoff_calls = (5 * 3, steps * 3) if retention else (3, steps * 3 - 3)
    rescale = np.poly1d(TEACACHE_COEFFICIENTS[("480", retention)])
    acc, prev, out = 0.0, None, []
    for cnt in range(0, steps * 3, 3):  # the cond branch's calls
        inp = modulated[cnt // 3]
        if cnt < ret_calls or cnt >= cutoff_calls:
            calc, acc = True, 0.0
        else:
            acc += rescale(((inp - prev).abs().mean() / prev.abs().mean()).item())
            calc = not acc < thresh
            acc = 0.0 if calc else acc
        prev = inp.clone()
        out.append(calc)
    return out


@pytest.mark.parametrize("retention, thresh, max_change", [(False, 0.05, 0.15), (True, 0.2, 0.01)])
def test_teacache_decisions_match_the_reference_counter_rule(retention, thresh, max_change):
    from infinitetalk.pipeline.teacache import TeaCache

    g = torch.Generator().manual_seed(3)
    steps, base = 20, torch.randn(1, 6, 16, generator=g)
    growth = torch.cumprod(1 + torch.rand(steps, generator=g) * max_change, 0)  # relative changes 0..max_change
    modulated = [base * s for s in growth]
    expected = _reference_counter_rule(modulated, steps, thresh, retention)
    assert True in expected[6:-1] and False in expected  # both outcomes past the retention steps
    cache = TeaCache(threshold=thresh, scale="480", retention_steps=retention)
    cache.start_window(steps)
    assert [cache.decide(i, 1, m) for i, m in enumerate(modulated)] == expected


def test_teacache_in_the_sampler_reuses_residuals_batched_or_not():
    from infinitetalk.pipeline.teacache import TeaCache

    dit, cond, x = _tiny_dit_cond(2)
    times = timesteps(4, 5.0)
    runs = []
    dit.blocks[0].register_forward_pre_hook(lambda *a: runs.append(1))
    noise = torch.randn_like(x)
    motion = noise[:, :1]
    cache, cache_seq = TeaCache(threshold=0.2), TeaCache(threshold=0.2)
    with torch.inference_mode():
        out = sample_window(dit, noise, cond, times, Guidance(5.0, 4.0), motion, teacache=cache, batch=True)
        batched_runs = len(runs)
        seq = sample_window(dit, noise, cond, times, Guidance(5.0, 4.0), motion, teacache=cache_seq)
        plain = sample_window(dit, noise, cond, times, Guidance(5.0, 4.0), motion, batch=True)
    computed = [c for s, b, c in cache.decisions if b == 0]
    assert computed[0] and computed[-1] and not all(computed)  # tiny model: the middle steps are skipped
    assert all([c for s, b, c in cache.decisions if b == k] == computed for k in (1, 2))
    assert cache_seq.decisions == cache.decisions
    assert batched_runs == sum(computed)  # one batched block pass per computed step, none for skipped ones
    err = float((out.double() - seq.double()).norm() / seq.double().norm())
    assert err <= 1e-6 and torch.isfinite(out).all()
    assert not torch.allclose(out, plain)  # skipping is an approximation, and it is really applied
    with pytest.raises(ValueError, match="quality"):
        sample_window(dit, noise, cond, times, Guidance(1.0, 2.0), motion, teacache=cache)


def test_teacache_with_every_step_computed_is_exact():
    from infinitetalk.pipeline.teacache import TeaCache

    dit, cond, x = _tiny_dit_cond(1)
    times = timesteps(2, 5.0)  # retention steps: the first 5 steps always run
    cache = TeaCache(retention_steps=True)
    with torch.inference_mode():
        a = sample_window(dit, x, cond, times, Guidance(5.0, 4.0), x[:, :1], teacache=cache)
        b = sample_window(dit, x, cond, times, Guidance(5.0, 4.0), x[:, :1])
    assert all(c for _, _, c in cache.decisions) and len(cache.decisions) == 6
    assert torch.equal(a, b)
