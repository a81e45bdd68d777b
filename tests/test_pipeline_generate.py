"""End to end with the real tiny models (CPU): length, audio, seeds, resume, orders, resolutions, video
input, mask-keep, bad inputs.

Most runs use the same loop at a smaller window (21 frames, 5 motion frames: 2 windows for 1.2 s of audio)
to stay fast; one run uses the reference's 81/9 windows. Frames are 32×32 (size_scale 0.05).
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from infinitetalk.demo import synthetic_voice, two_faces_image, write_png
from infinitetalk.errors import InputError, JobCancelled
from infinitetalk.audio.io import write_wav
from infinitetalk.pipeline.generate import generate
from infinitetalk.pipeline.request import GenerationRequest
from infinitetalk.pipeline.resolution import select_bucket
from infinitetalk.files import partial_path

SMALL = dict(steps=1, size_scale=0.05, frame_num=21, motion_frames=5)
RATE = 22050


@pytest.fixture(scope="module")
def models(tiny_models):
    from infinitetalk.pipeline.models import load_models

    return load_models(tiny_models, preset="quality", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    image = two_faces_image(128, 192)
    out = {
        "image": write_png(d / "two.png", image),
        "left": write_wav(d / "left.wav", synthetic_voice(0.6, 120.0, RATE, seed=1)[None], RATE),
        "right": write_wav(d / "right.wav", synthetic_voice(0.6, 200.0, RATE, seed=2)[None], RATE),
        "left_long": write_wav(d / "left_long.wav", synthetic_voice(1.7, 120.0, RATE, seed=3)[None], RATE),
        "right_long": write_wav(d / "right_long.wav", synthetic_voice(1.7, 200.0, RATE, seed=4)[None], RATE),
    }
    # a 0.8 s source video (shorter than the audio: ping-pong) whose frames are all different
    with av.open(str(d / "source.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 192, 128, "yuv420p"
        for i in range(20):
            frame = np.roll(image, 4 * i, axis=1)
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        c.mux(s.encode(None))
    out["video"] = d / "source.mp4"
    return out


def _read(path: Path) -> tuple[np.ndarray, float, dict]:
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        a = c.streams.audio[0]
        audio_seconds = float(a.duration * a.time_base)
        meta = json.loads(c.metadata["comment"])
    return frames, audio_seconds, meta


def _request(media, tmp_path, name="out.mp4", **kw) -> GenerationRequest:
    args = dict(left_audio=media["left"], right_audio=media["right"], image=media["image"], out=tmp_path / name, **SMALL)
    args.update(kw)
    return GenerationRequest(**args)


def _collect(store: dict):
    return lambda k, frames: store.__setitem__(k, frames.clone())


def test_image_left_right_480p_exact_length_seed_and_resume(models, media, tmp_path):
    """Frames are compared before encoding (on_window) and the finished files byte for byte."""
    seen, progress = {}, []
    req = _request(media, tmp_path, "a.mp4", seed=11, order="left_right")
    a = generate(req, models, progress=lambda d, t: progress.append((d, t)), on_window=_collect(seen))
    frames_a, audio_s, meta = _read(a.path)
    expected = (2 * int(0.6 * RATE) * 25) // RATE                    # left then right, 25 fps
    assert a.frames == expected == len(frames_a) == 30
    assert abs(audio_s - expected / 25) < 0.03
    assert (a.height, a.width) == select_bucket(128, 192, "480p", 0.05) == frames_a.shape[1:3]
    assert meta["seed"] == 11 and meta["shift"] == 7.0 and meta["order"] == "left_right"
    total = 2 + 2 * (1 + 1 + 6)    # prepare + write; per window: encode, 1 step, 6 latent frames decoded
    assert progress[0] == (0, total) and progress[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(progress, progress[1:])) and len(progress) == total + 1
    assert {k: (tuple(f.shape), f.dtype) for k, f in seen.items()} == {0: ((21, 32, 32, 3), torch.uint8),
                                                                    1: ((9, 32, 32, 3), torch.uint8)}
    assert not (tmp_path / ".a.job").exists()                        # job folder removed after success

    # crash after the first window (cancel at the first step of window 1), then resume
    job = tmp_path / "job"
    req_b = _request(media, tmp_path, "b.mp4", seed=11, order="left_right", job_dir=job)
    infos, first, resumed = [], {}, {}
    with pytest.raises(JobCancelled):
        generate(req_b, models, progress=lambda d, t, info: infos.append(info),
                 cancel=lambda: bool(infos) and infos[-1].window >= 1, on_window=_collect(first))
    assert infos[-1].stage == "steps" and infos[-1].remaining["decode"] == 6 and infos[-1].resumed_windows == 0
    assert not req_b.out.exists() and not partial_path(req_b.out).exists()
    assert json.loads((job / "state.json").read_text())["windows_done"] == 1
    b = generate(req_b, models, on_window=_collect(resumed), progress=lambda d, t, info: infos.append(info))
    assert infos[-1].resumed_windows == 1 and infos[-1].remaining == dict.fromkeys(infos[-1].remaining, 0)
    assert b.resumed_windows == 1 and b.seed == 11 and list(resumed) == [1]
    assert torch.equal(first[0], seen[0]) and torch.equal(resumed[1], seen[1])   # same seed, same frames
    frames_b, _, _ = _read(b.path)
    assert np.array_equal(frames_b, frames_a)
    assert b.path.read_bytes() == a.path.read_bytes()                # the resumed job writes the same file


def test_real_window_sizes_right_left_random_seed(models, media, tmp_path):
    req = GenerationRequest(left_audio=media["left_long"], right_audio=media["right_long"], image=media["image"],
                            out=tmp_path / "r.mp4", order="right_left", seed=-1, steps=1, size_scale=0.05)
    r = generate(req, models)
    frames, audio_s, meta = _read(r.path)
    expected = (2 * int(1.7 * RATE) * 25) // RATE                    # 85 frames: windows [0, 81) and [72, 153)
    assert r.frames == len(frames) == expected and r.windows == 2
    assert abs(audio_s - expected / 25) < 0.03
    assert 0 <= r.seed < 2**31 and meta["seed"] == r.seed            # the drawn seed is recorded


def test_video_input_meanwhile_720p_reads_the_window_start_frames(models, media, tmp_path, monkeypatch):
    from infinitetalk.pipeline import inputs as inputs_mod

    asked = []
    original = inputs_mod.ReferenceSource.frame
    monkeypatch.setattr(inputs_mod.ReferenceSource, "frame", lambda self, i: (asked.append(i), original(self, i))[1])
    req = _request(media, tmp_path, "v.mp4", image=None, video=media["video"], resolution="720p", seed=5,
                   left_audio=media["left_long"], right_audio=media["right_long"])
    r = generate(req, models)
    frames, audio_s, meta = _read(r.path)
    assert meta["order"] == "meanwhile" and meta["shift"] == 11.0
    assert r.frames == len(frames) == (int(1.7 * RATE) * 25) // RATE  # meanwhile: both at once
    assert r.windows == 3
    assert (r.height, r.width) == select_bucket(128, 192, "720p", 0.05) == frames.shape[1:3] == (32, 64)
    assert {0, 16, 32} <= set(asked)                                 # each window's reference = source frame at its start


def test_mask_keeps_everything_outside_it(models, media, tmp_path):
    from infinitetalk.pipeline.resolution import resize_cover_crop

    mask = np.zeros((128, 192, 3), np.uint8)
    mask[40:88, 64:128] = 255                                         # a central box may move
    write_png(tmp_path / "mask.png", mask)
    common = dict(seed=3, color_strength=0.0, size_scale=0.1, order="left_right")
    kept = generate(_request(media, tmp_path, "k.mp4", mask_image=tmp_path / "mask.png", **common), models)
    free = generate(_request(media, tmp_path, "f.mp4", **common), models)
    frames_k, _, _ = _read(kept.path)
    frames_f, _, _ = _read(free.path)
    h, w = frames_k.shape[1:3]
    src = resize_cover_crop(torch.from_numpy(two_faces_image(128, 192)), (h, w)).numpy().astype(np.float32)
    m = resize_cover_crop(torch.from_numpy(mask[..., :1]), (h, w), mode="nearest").numpy()[..., 0] > 0
    outside = ~torch.nn.functional.max_pool2d(torch.from_numpy(m).float()[None], 25, 1, 12)[0].bool().numpy()
    inside = m
    err = lambda frames, where: np.abs(frames.astype(np.float32) - src)[:, where].mean()
    assert outside.sum() > 0.2 * h * w
    assert err(frames_k, outside) < 4.0, err(frames_k, outside)       # the source, up to h264 noise
    assert err(frames_f, outside) > 5 * err(frames_k, outside)        # and it is the mask that does it
    assert err(frames_k, inside) > 5 * err(frames_k, outside)         # inside, the model generated freely


def test_full_frame_mask_still_makes_a_picture(models, media, tmp_path):
    write_png(tmp_path / "white.png", np.full((128, 192, 3), 255, np.uint8))
    r = generate(_request(media, tmp_path, "w.mp4", mask_image=tmp_path / "white.png", order="meanwhile", seed=1),
                 models)
    frames, _, _ = _read(r.path)
    assert len(frames) == r.frames and frames.mean() > 20 and frames.std() > 5   # not a black (or flat) video


class NoModels:
    """Stands in for the models: any use means model work started before the inputs were checked."""

    def __getattr__(self, name):
        raise AssertionError(f"model work ({name}) before the inputs were checked")


def _nan_wav(path: Path) -> Path:
    with av.open(str(path), "w", format="wav") as c:
        s = c.add_stream("pcm_f32le", rate=16000, layout="mono")
        x = np.zeros((1, 16000), np.float32)
        x[0, 100] = np.nan
        frame = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, 0, Fraction(1, 16000)
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


def _bad(kind: str, media, d: Path) -> tuple[dict, str]:
    if kind == "corrupt_audio":
        (d / "bad.wav").write_bytes(b"RIFF\x00\x00junkjunk" * 50)
        return {"left_audio": d / "bad.wav"}, "left_audio"
    if kind == "empty_audio":
        (d / "empty.wav").write_bytes(b"")
        return {"right_audio": d / "empty.wav"}, "right_audio"
    if kind == "nan_audio":
        return {"left_audio": _nan_wav(d / "nan.wav")}, "left_audio"
    if kind == "too_long_audio":
        return {"right_audio": write_wav(d / "long.wav", np.zeros((1, 601 * 8000), np.float32), 8000)}, "right_audio"
    if kind == "tiny_image":
        return {"image": write_png(d / "dot.png", np.zeros((1, 1, 3), np.uint8))}, "image"
    if kind == "no_frame_video":
        write_wav(d / "sound_only.wav", np.zeros((1, 8000), np.float32), 8000)
        (d / "sound_only.mp4").write_bytes((d / "sound_only.wav").read_bytes())
        return {"image": None, "video": d / "sound_only.mp4"}, "video"
    if kind == "empty_mask":
        return {"mask_image": write_png(d / "black.png", np.zeros((64, 64, 3), np.uint8))}, "mask_image"
    if kind == "unreadable_mask":
        (d / "mask.png").write_text("not an image")
        return {"mask_image": d / "mask.png"}, "mask_image"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["corrupt_audio", "empty_audio", "nan_audio", "too_long_audio", "tiny_image",
                                  "no_frame_video", "unreadable_mask", "empty_mask"])
def test_bad_inputs_fail_before_model_work_and_leave_nothing(kind, media, tmp_path):
    change, name = _bad(kind, media, tmp_path)
    req = _request(media, tmp_path, "bad.mp4", **change)
    with pytest.raises(InputError) as info:
        generate(req, NoModels())
    assert info.value.input_name == name, str(info.value)
    assert not req.out.exists() and not partial_path(req.out).exists()
    assert not (tmp_path / ".bad.job").exists()


def test_teacache_with_a_sampler_that_lacks_it_is_refused_before_model_work(media, tmp_path):
    class OnlySampler:   # a multi-process sampler that does not declare step skipping
        step_skipping = False

        def __call__(self, dit, noise, cond, times, guidance, motion, keep=None, on_step=None):
            raise AssertionError("sampled")

    req = _request(media, tmp_path, "tea.mp4", steps=3, teacache=0.2)
    with pytest.raises(InputError, match="multi-process") as info:
        generate(req, NoModels(), sampler=OnlySampler())
    assert info.value.input_name == "teacache"
    assert not (tmp_path / ".tea.job").exists() and not req.out.exists()


@pytest.mark.slow
def test_teacache_is_recorded_in_the_metadata_and_needs_the_quality_recipe(models, media, tmp_path):
    result = generate(_request(media, tmp_path, "tea.mp4", seed=5, steps=3, teacache=0.2), models)
    _, _, meta = _read(result.path)
    assert meta["teacache"] == {"threshold": 0.2, "scale": "480", "retention_steps": False}
    with pytest.raises(InputError, match="teacache"):
        _request(media, tmp_path, "fast.mp4", preset="fast", teacache=0.2).validate()
    with pytest.raises(InputError, match="teacache"):
        _request(media, tmp_path, "bad.mp4", teacache=-1).validate()


def test_video_denoise_starts_from_the_source_part_way_down(models, media, tmp_path):
    """denoise < 1 (video only): the window starts from its source latents noised to the first model time at or
    below denoise x 1000, so fewer steps run and the result stays nearer the source; 1 is the reference path."""
    def run(name, **kw):
        steps: list[int] = []
        hook = lambda done, total, info: steps.append(info.step) if info.stage == "steps" else None  # noqa: E731
        r = generate(_request(media, tmp_path, name, image=None, video=media["video"], seed=3,
                              **dict(SMALL, steps=4), **kw), models, progress=hook)
        return r, _read(r.path), steps

    full, (full_frames, _, full_meta), full_steps = run("full.mp4")
    half, (half_frames, _, half_meta), half_steps = run("half.mp4", denoise=0.5)
    assert "denoise" not in full_meta and half_meta["denoise"] == 0.5
    assert len(full_steps) == 4 * full.windows and len(half_steps) < len(full_steps)   # started part way down
    assert full_frames.shape == half_frames.shape and not np.array_equal(full_frames, half_frames)
    with pytest.raises(InputError, match="denoise"):   # a picture has no source motion to keep
        generate(_request(media, tmp_path, "img.mp4", denoise=0.5), models)
