"""Sampler schedule, chunk plan and audio windows: reference values, golden cases, invariants, bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import golden_cases
from infinitetalk.errors import InputError
from infinitetalk.parity.runner import Case
from infinitetalk.pipeline.schedule import euler_step, shift_for, timesteps
from infinitetalk.limits import FPS, MAX_SECONDS
from infinitetalk.pipeline.windows import (ChunkPlan, check_chunk_sizes, frames_for_samples,
                                           frames_for_seconds, gather_audio_window, gather_audio_windows, plan_chunks)


def test_timesteps_match_published_values():
    # values quoted from the reference run (model notes §6)
    t = timesteps(40, 7)
    assert t.dtype == torch.float32 and t.shape == (41,)
    assert t[0] == 1000 and t[-1] == 0
    np.testing.assert_allclose(t[[1, 2, 38, 39]].numpy(), [996.259, 992.345, 160.653, 6.958], atol=1e-3)
    np.testing.assert_allclose(timesteps(4, 2).numpy(), [1000, 800.24, 500.75, 1.998, 0], atol=1e-2)
    np.testing.assert_allclose(timesteps(40, 11)[38:].numpy(), [231.227, 10.891, 0], atol=1e-3)
    assert bool((timesteps(8, 2)[:-1] > timesteps(8, 2)[1:]).all())


def test_shift_and_bad_steps():
    assert shift_for("480p") == 7 and shift_for("720p") == 11
    with pytest.raises(InputError, match="resolution"):
        shift_for("1080p")
    with pytest.raises(InputError, match="steps"):
        timesteps(0, 7)


def test_euler_step_is_flow_matching_update():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    out = euler_step(x, v, 1000.0, 750.0)
    torch.testing.assert_close(out, x - 0.25 * v)
    # integrating the exact velocity of a straight path lands on x0
    x0, noise = torch.randn(4), torch.randn(4)
    ts = timesteps(8, 3)
    x = noise.clone()
    for i in range(8):
        x = euler_step(x, noise - x0, ts[i], ts[i + 1])
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)
    assert euler_step(x.bfloat16(), v[0, :1].expand(4), 10, 0).dtype == torch.bfloat16


@pytest.mark.parametrize("case_dir", golden_cases("chunk_plan"), ids=lambda p: p.name)
def test_chunk_plan_golden(case_dir):
    case = Case.load(case_dir)
    c = case.call
    plan = plan_chunks(c["audio_frames"], c["frame_num"], c["motion_frames"], c["max_frames"])
    assert json.loads(json.dumps(plan.to_json())) == case.expected_json


def _reference_loop(n, frame_num=81, motion=9, max_frames=10**9):
    """Direct transcription of the reference loop's control flow, as an independent oracle."""
    start, end, windows, last, pad = 0, frame_num, [], False, 0
    while True:
        windows.append((start, end))
        if last:
            break
        start += frame_num - motion
        end = start + frame_num
        if end >= min(max_frames, n):
            last = True
            pad = end - n + 3 if end >= n else 0
        if max_frames <= frame_num:
            break
    total = frame_num + (len(windows) - 1) * (frame_num - motion)
    final = min(total, max_frames)
    if max_frames > frame_num and pad > 0:
        final = min(final, n)
    return windows, final


@pytest.mark.parametrize("n", [82, 83, 152, 153, 154, 225, 226, 297, 500, 999, 1001, 3000])
@pytest.mark.parametrize("max_frames", [81, 100, 1000, None])
def test_chunk_plan_matches_reference_loop(n, max_frames):
    plan = plan_chunks(n, max_frames=max_frames)
    windows, final = _reference_loop(n, max_frames=10**9 if max_frames is None else max_frames)
    assert plan.windows == windows and plan.final_frames == final
    assert plan.generated_frames == plan.windows[-1][1]
    kept = sum(max(0, hi - lo) for lo, hi in (plan.kept_range(k) for k in range(plan.num_chunks)))
    assert kept == plan.final_frames


@pytest.mark.parametrize("n", [1, 25, 80, 81])
def test_short_audio_is_one_window_trimmed_to_audio(n):
    plan = plan_chunks(n)
    assert plan.windows == [(0, 81)] and plan.final_frames == n and plan.padded
    assert plan.kept_range(0) == (0, n)
    win, m = gather_audio_window(torch.arange(n, dtype=torch.float32)[:, None], 0)
    assert win.shape == (81, 5, 1) and m == 81 - n + 3
    # first rows are the real audio, then the mirrored tail (never an out-of-range index)
    assert win[: max(n - 2, 0), 2, 0].tolist() == list(range(max(n - 2, 0)))
    assert float(win.max()) <= n - 1


def test_plan_rejects_bad_inputs():
    with pytest.raises(InputError, match="audio"):
        plan_chunks(0)
    with pytest.raises(InputError, match="motion_frames"):
        plan_chunks(100, motion_frames=81)
    with pytest.raises(InputError, match="frame_num"):
        check_chunk_sizes(80, 9)
    with pytest.raises(InputError, match="motion_frames"):
        check_chunk_sizes(81, 8)
    check_chunk_sizes(81, 9)
    # the arithmetic itself works for any sizes (e.g. the reference function default of 25 motion frames)
    assert plan_chunks(200, 33, 8).windows == [(0, 33), (25, 58), (50, 83), (75, 108), (100, 133), (125, 158),
                                                (150, 183), (175, 208)]
    with pytest.raises(InputError, match="max_frames"):
        plan_chunks(100, max_frames=0)


@pytest.mark.parametrize("case_dir", golden_cases("audio_windows"), ids=lambda p: p.name)
def test_audio_windows_golden(case_dir):
    case = Case.load(case_dir)
    win, m = gather_audio_window(case.inputs()["embeddings"], case.call["start"], case.call["frame_num"],
                                 case.call["window"])
    assert m == case.expected_json["mirror_pad_rows"]
    assert torch.equal(win, case.expected()["window"])


@pytest.mark.parametrize("n,start", [(300, 0), (300, 144), (300, 216), (250, 216), (90, 72)])
def test_audio_window_formula(n, start):
    emb = torch.randn(n, 2, 3)
    win, m = gather_audio_window(emb, start)
    table = emb if start + 81 < n else torch.cat([emb, emb.flip(0)[: start + 81 - n + 3]])
    for i in (0, 1, 40, 79, 80):
        for o in range(5):
            assert torch.equal(win[i, o], table[min(max(start + i + o - 2, 0), len(table) - 1)])
    both = gather_audio_windows([emb, emb * 2], start)
    assert both.shape == (2, 81, 5, 2, 3) and torch.equal(both[1], win * 2)


def test_frame_helpers():
    assert frames_for_samples(16000 * 4 + 639, 16000) == 100 and frames_for_samples(16000 * 4 + 640, 16000) == 101
    assert frames_for_seconds(3.28) == 82 and frames_for_seconds(0.039) == 0
    assert MAX_SECONDS == 600 and FPS == 25
    assert isinstance(plan_chunks(100), ChunkPlan)
