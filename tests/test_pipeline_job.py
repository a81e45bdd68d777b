"""Job folder commit/resume rules and the segment join (exact frames, exact audio length, atomic)."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from infinitetalk.pipeline.job import JobFolder, JobState, default_job_dir, fingerprint
from infinitetalk.pipeline.request import GenerationRequest
from infinitetalk.files import partial_path
from infinitetalk.video.segments import concat_segments
from infinitetalk.video.writer import Mp4Writer


def _frames(n, seed, h=48, w=64):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 255, (n, h, w, 3), dtype=np.uint8))


def _decode(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_concat_segments_keeps_every_frame_bit_exact_and_cuts_audio(tmp_path):
    segs = []
    for i, n in enumerate((81, 72, 30)):
        w = Mp4Writer(tmp_path / f"s{i}.mp4", 64, 48, crf=23)
        w.write(_frames(n, i))
        segs.append(w.close())
    expected = np.concatenate([_decode(p) for p in segs])
    frames = len(expected)
    rate = 44100
    audio = np.sin(np.arange(rate * 8) / 20).astype(np.float32)[None].repeat(2, 0)   # longer than the video
    out = tmp_path / "out.mp4"
    concat_segments(segs, out, frames=frames, audio=(audio, rate), metadata={"comment": json.dumps({"seed": 5})})
    assert not partial_path(out).exists()
    np.testing.assert_array_equal(_decode(out), expected)
    with av.open(str(out)) as c:
        assert json.loads(c.metadata["comment"])["seed"] == 5
        a = c.streams.audio[0]
        assert abs(float(a.duration * a.time_base) - frames / 25) < 0.03
        v = c.streams.video[0]
        assert abs(float(v.duration * v.time_base) - frames / 25) < 1e-6


def test_concat_failure_leaves_nothing_under_the_output_name(tmp_path):
    bad = tmp_path / "missing.mp4"
    out = tmp_path / "out.mp4"
    with pytest.raises(Exception):
        concat_segments([bad], out, frames=10)
    assert not out.exists() and not partial_path(out).exists()


def _request(tmp_path, **kw):
    for name in ("l.wav", "r.wav", "i.png"):
        (tmp_path / name).write_bytes(name.encode())
    return GenerationRequest(left_audio=tmp_path / "l.wav", right_audio=tmp_path / "r.wav", image=tmp_path / "i.png",
                             out=tmp_path / "o.mp4", **kw)


def test_fingerprint_tracks_parameters_and_file_content_not_output_name(tmp_path):
    a = fingerprint(_request(tmp_path, seed=1))
    assert a == fingerprint(_request(tmp_path, seed=1, job_dir=tmp_path / "elsewhere"))
    assert a != fingerprint(_request(tmp_path, seed=2))
    assert a != fingerprint(_request(tmp_path, seed=1), models_id="other")
    req = _request(tmp_path, seed=1)
    (tmp_path / "l.wav").write_bytes(b"changed")
    assert fingerprint(req) != a
    assert default_job_dir(Path("x/y/video.mp4")) == Path("x/y/.video.job")


def test_job_folder_resumes_only_committed_windows_of_the_same_job(tmp_path):
    job = JobFolder(tmp_path / "job")
    state = JobState(fingerprint="abc", seed=9, windows_total=3)
    job.start(state)
    assert job.load("abc").windows_done == 0
    job.segment(0).write_bytes(b"seg0")
    job.save_tail(0, torch.ones(3, 9, 4, 4))
    state.windows_done = 1
    job.commit(state)
    job.segment(1).write_bytes(b"seg1")          # window 1 finished its segment but crashed before commit
    job.save_tail(1, torch.zeros(3, 9, 4, 4))
    loaded = job.load("abc")
    assert loaded.windows_done == 1 and loaded.seed == 9
    assert torch.equal(job.load_tail(0), torch.ones(3, 9, 4, 4))
    assert job.load("other") is None             # a different request does not reuse the folder
    job.segment(0).unlink()
    assert job.load("abc") is None               # a missing segment invalidates the state
    partial_path(job.segment(1)).write_bytes(b"half")  # a writer killed mid-segment (no cleanup could run)
    job.start(JobState(fingerprint="new", seed=1, windows_total=1))
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [JobFolder.STATE]
