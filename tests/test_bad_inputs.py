"""The bad-input suite: every class of hostile or broken input is refused quickly, within bounded memory, with an
error naming the input and the limit — never a native crash, a traceback, or a job that "succeeds" wrongly.

All files are generated here (bombs are real: small files that would decode to gigabytes). Each refusal runs
under `bounded()`, which fails the test when it takes more than a few seconds or raises the process's peak
memory by more than 1 GB.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import resource
import struct
import subprocess
import sys
import time
import wave
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from infinitetalk.pipeline import masks
from infinitetalk.audio.io import probe_audio
from infinitetalk.pipeline.masks import check_mask
from infinitetalk.video.reader import ImageInfo, image_size_from_header, probe_image
from infinitetalk.audio.io import load_audio, write_wav
from infinitetalk.cli import main
from infinitetalk.demo import synthetic_voice, two_faces_image, write_png
from infinitetalk.errors import CheckpointError, InputError, OutOfSpace

GB_KB = 1 << 20        # ru_maxrss is in kB on Linux


@contextmanager
def bounded(seconds: float = 5.0, extra_kb: int = GB_KB):
    """Fail when the block takes longer than `seconds` or raises peak RSS by more than `extra_kb`."""
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    yield
    took = time.perf_counter() - t0
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0
    assert took < seconds, f"took {took:.1f} s"
    assert grew < extra_kb, f"peak memory grew by {grew / 1024:.0f} MB"


# -- generated files ------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A real, valid grey PNG of width×height black pixels: tiny on disk, width·height bytes decoded."""
    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data)
                     + _png_chunk(b"IEND", b""))
    return path


def jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A JPEG whose frame header (SOF0) announces width×height (after an APP0 segment to walk past)."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    path.write_bytes(b"\xff\xd8" + app0 + sof + b"\xff\xd9")
    return path


def webp_claiming(path: Path, width: int, height: int) -> Path:
    """An extended (VP8X) WebP header announcing width×height."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x)
    return path


def wav(path: Path, channels: int, rate: int, frames: int) -> Path:
    """16-bit PCM wav (stdlib: no encoder limits on rate or channel count)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.arange(frames * channels) % 64 - 32).astype("<i2").tobytes())
    return path


def flac_claiming(path: Path, channels: int, rate: int, frames: int, claim_frames: int) -> Path:
    """A real FLAC of `frames` silent frames whose STREAMINFO claims `claim_frames` (FFmpeg trusts it)."""
    import av

    layout = {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1"}[channels]
    with av.open(str(path), "w") as c:
        s = c.add_stream("flac", rate=rate, layout=layout)
        f = av.AudioFrame.from_ndarray(np.zeros((1, frames * channels), np.int16), format="s16", layout=layout)
        f.sample_rate, f.pts = rate, 0
        for packet in [*s.encode(f), *s.encode(None)]:
            c.mux(packet)
    raw = bytearray(path.read_bytes())
    assert raw[:4] == b"fLaC"
    bits = int.from_bytes(raw[18:26], "big")                   # STREAMINFO: rate, channels, bits, total samples
    bits = (bits & ~((1 << 36) - 1)) | claim_frames
    raw[18:26] = bits.to_bytes(8, "big")
    path.write_bytes(bytes(raw))
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("good_inputs")
    return {
        "image": write_png(d / "two.png", two_faces_image(128, 192)),
        "left": write_wav(d / "l.wav", synthetic_voice(0.6, 120.0, 16000, seed=1)[None], 16000),
        "right": write_wav(d / "r.wav", synthetic_voice(0.6, 200.0, 16000, seed=2)[None], 16000),
        "black": write_png(d / "black.png", np.zeros((128, 192, 3), np.uint8)),
        "white": write_png(d / "white.png", np.full((128, 192, 3), 255, np.uint8)),
    }


def cli(tmp_path: Path, good: dict, capsys, **files) -> tuple[int, str]:
    """Run `generate` with the good inputs, some replaced (keys: image, left, right, mask_image, video)."""
    f = {**good, **files}
    args = ["generate", "--models", str(tmp_path / "no-models"), "--left-audio", str(f["left"]),
            "--right-audio", str(f["right"]), "--out", str(tmp_path / "out.mp4"), "--size-scale", "0.05"]
    args += ["--video", str(f["video"])] if "video" in f else ["--image", str(f["image"])]
    if "mask_image" in f:
        args += ["--mask", str(f["mask_image"])]
    rc = main(args)
    return rc, capsys.readouterr().err


# -- 1. decompression bombs and budgets, refused from headers ---------------------------------------------
def test_png_bomb_is_refused_from_its_header_by_the_cli(tmp_path, good, capsys):
    bomb = png_bomb(tmp_path / "bomb.png", 8000, 6000)             # 48 MP; ~50 kB on disk
    assert bomb.stat().st_size < 200_000
    with bounded(seconds=3.0, extra_kb=200 * 1024):                 # decoding would take ≥ 48 MB (gray) … 144 MB (RGB)
        rc, err = cli(tmp_path, good, capsys, image=bomb)
    assert rc == 2
    assert "image: " in err and "8000×6000" in err and "40 megapixels (MAX_PIXELS)" in err
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("maker,field", [(jpeg_claiming, "image"), (webp_claiming, "mask_image"),
                                         (png_bomb, "left_mask")])
def test_image_headers_over_the_limits(tmp_path, maker, field):
    path = maker(tmp_path / f"x.{maker.__name__}", 20000, 30)          # one side too long, few pixels
    with bounded(seconds=3.0):
        with pytest.raises(InputError, match=rf"^{field}: .*20000×30.*at most 16384 \(MAX_SIDE\)"):
            probe_image(path, field)


def test_other_formats_are_probed_by_capped_decoders(tmp_path):
    import av

    # TIFF has no hand-read header here: FFmpeg's probe runs with decoders capped at MAX_PIXELS
    bomb = tmp_path / "bomb.tiff"
    with av.open(str(bomb), "w", format="image2") as c:
        s = c.add_stream("tiff")
        s.width, s.height, s.pix_fmt, s.options = 7000, 6000, "gray", {"compression_algo": "deflate"}
        c.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((6000, 7000), np.uint8), format="gray")))
        c.mux(s.encode(None))
    assert bomb.stat().st_size < 200_000
    with bounded(seconds=2.0, extra_kb=20 * 1024):
        with pytest.raises(InputError, match=r"^image: .*larger than 40 megapixels \(MAX_PIXELS\)"):
            probe_image(bomb, "image")


def test_image_header_sizes_are_read_not_guessed(tmp_path):
    assert image_size_from_header(jpeg_claiming(tmp_path / "a.jpg", 1234, 567)) == ImageInfo(1234, 567, "jpeg")
    assert image_size_from_header(webp_claiming(tmp_path / "a.webp", 300, 200)) == ImageInfo(300, 200, "webp")
    real = write_png(tmp_path / "a.png", two_faces_image(40, 64))
    assert probe_image(real, "image") == ImageInfo(64, 40, "png")
    tiny = write_png(tmp_path / "t.png", np.zeros((16, 64, 3), np.uint8))
    with pytest.raises(InputError, match="image: .*64×16.*at least 32"):
        probe_image(tiny, "image")
    # an OS/2 bitmap (12-byte core header, 16-bit sides) is 40×36, not 36·65536+40 wide
    row = bytes(40 * 3)                                               # 120 bytes: already a multiple of 4
    os2 = tmp_path / "os2.bmp"
    os2.write_bytes(b"BM" + struct.pack("<IHHI", 26 + 36 * len(row), 0, 0, 26)
                    + struct.pack("<IHHHH", 12, 40, 36, 1, 24) + row * 36)
    assert probe_image(os2, "image") == ImageInfo(40, 36, "bmp")
    from infinitetalk.video.reader import load_image

    assert tuple(load_image(os2).shape) == (36, 40, 3)


def test_audio_over_budget_is_refused_from_its_header(tmp_path, good, capsys):
    # 384 kHz: refused whatever its length
    fast = wav(tmp_path / "fast.wav", 6, 384000, 4000)
    with bounded():
        rc, err = cli(tmp_path, good, capsys, left=fast)
    assert rc == 2 and "left_audio: " in err and "384000 Hz" in err and "192000 Hz (MAX_SAMPLE_RATE)" in err
    # the header claims 200 s of 8-channel 48 kHz (77 M values) while the file holds 0.1 s: refused unread
    wide = flac_claiming(tmp_path / "wide.flac", 8, 48000, 4800, claim_frames=48000 * 200)
    with bounded(seconds=2.0, extra_kb=100 * 1024):
        with pytest.raises(InputError, match=r"right_audio: .*77 million.*64 million \(MAX_AUDIO_VALUES\)"):
            probe_audio(wide, "right_audio")


def test_decoding_stops_at_the_budget_when_the_header_cannot_tell(tmp_path, monkeypatch):
    # a stream (no path, so no header probe) must still stop decoding at MAX_AUDIO_VALUES
    path = wav(tmp_path / "long.wav", 2, 16000, 16000 * 4)
    monkeypatch.setattr("infinitetalk.audio.io.MAX_AUDIO_VALUES", 16000 * 2 * 2)
    with open(path, "rb") as stream, pytest.raises(InputError, match="left_audio: .*MAX_AUDIO_VALUES"):
        load_audio(stream, "left_audio")


# -- crashes: any channel count decodes -----------------------------------------------------------------
def test_nine_channel_audio_goes_through_input_preparation(tmp_path, good):
    from infinitetalk.pipeline.inputs import prepare_inputs
    from infinitetalk.pipeline.request import GenerationRequest

    left = wav(tmp_path / "9ch.wav", 9, 48000, 48000 // 2)
    req = GenerationRequest(left_audio=left, right_audio=good["right"], image=good["image"],
                            out=tmp_path / "o.mp4", size_scale=0.05).resolved()
    with bounded():
        prepared = prepare_inputs(req)
    prepared.source.close()
    samples, rate = prepared.mix
    assert samples.shape[0] == 9 and rate == 48000                     # the muxer mixes it down (checked early)


# -- 2. what used to fail late fails early --------------------------------------------------------------
def test_too_short_audio_is_refused_before_model_work(tmp_path, good, capsys):
    short = wav(tmp_path / "short.wav", 1, 16000, 480)                  # 30 ms
    with bounded():
        rc, err = cli(tmp_path, good, capsys, right=short)
    assert rc == 2 and "right_audio: the audio is 30 ms long; at least 100 ms (MIN_AUDIO_SECONDS)" in err


def test_192khz_audio_is_muxed_at_a_rate_aac_accepts(tmp_path, good):
    import av

    from infinitetalk.video.segments import concat_segments
    from infinitetalk.video.writer import Mp4Writer

    hi = write_wav(tmp_path / "hi.wav", synthetic_voice(0.5, 150.0, 192000, seed=3)[None].repeat(2, 0), 192000)
    clip = load_audio(hi, "left_audio")
    assert clip.sample_rate == 192000
    with Mp4Writer(tmp_path / "seg.mp4", 32, 32) as w:
        w.write(np.zeros((10, 32, 32, 3), np.uint8))
    out = concat_segments([tmp_path / "seg.mp4"], tmp_path / "o.mp4", frames=10,
                          audio=(clip.samples.numpy(), clip.sample_rate))
    with av.open(str(out)) as c:
        assert c.streams.audio[0].sample_rate == 48000 and c.streams.audio[0].channels == 2


def test_empty_mask_is_refused_in_every_path(tmp_path, good, capsys):
    from infinitetalk.pipeline.inputs import prepare_inputs
    from infinitetalk.pipeline.request import GenerationRequest

    with bounded():                                                     # CLI
        rc, err = cli(tmp_path, good, capsys, mask_image=good["black"])
    assert rc == 2 and "mask_image: " in err and "empty" in err
    # the nodes / API graph path: explicit speaker masks plus the keep mask (used to "succeed", nothing moving)
    left = write_png(tmp_path / "lm.png", np.pad(np.full((128, 96, 3), 255, np.uint8), ((0, 0), (0, 96), (0, 0))))
    right = write_png(tmp_path / "rm.png", np.pad(np.full((128, 96, 3), 255, np.uint8), ((0, 0), (96, 0), (0, 0))))
    req = GenerationRequest(left_audio=good["left"], right_audio=good["right"], image=good["image"],
                            out=tmp_path / "o.mp4", size_scale=0.05, mask_image=good["black"],
                            left_mask=left, right_mask=right).resolved()
    with pytest.raises(InputError, match="^mask_image: the mask is empty"):
        prepare_inputs(req)
    # API submit time
    with pytest.raises(InputError, match="^mask_image: the mask is empty"):
        check_mask(good["black"], "mask_image")
    check_mask(good["white"], "mask_image")                     # a full mask is valid: everything moves


def _rgba_png(path: Path, rgba: np.ndarray) -> Path:
    rows = b"".join(b"\0" + row.tobytes() for row in np.ascontiguousarray(rgba, np.uint8))
    ihdr = struct.pack(">IIBBBBB", rgba.shape[1], rgba.shape[0], 8, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows))
                     + _png_chunk(b"IEND", b""))
    return path


def test_check_mask_reads_strips_with_the_pipeline_rule(tmp_path, monkeypatch):
    """Thresholded strip by strip (4 rows here), a mark in the last row, or only in the alpha, still counts."""
    from infinitetalk.pipeline.masks import mask_from_array

    monkeypatch.setattr(masks, "_MASK_STRIP_PIXELS", 4 * 40)
    last_row = np.zeros((33, 40, 3), np.uint8)
    last_row[-1, 7] = 255
    check_mask(write_png(tmp_path / "last.png", last_row))
    grey = np.full((33, 40, 3), 127, np.uint8)                         # 127/255 < 0.5: not marked
    with pytest.raises(InputError, match="^mask_image: the mask is empty"):
        check_mask(write_png(tmp_path / "grey.png", grey))
    rgba = np.zeros((33, 40, 4), np.uint8)                              # black, transparent but one opaque pixel
    rgba[31, 39, 3] = 255
    assert bool(mask_from_array(torch.from_numpy(rgba), 33, 40).any())
    check_mask(_rgba_png(tmp_path / "alpha.png", rgba))
    rgba[..., :3], rgba[..., 3] = 255, 0                                # white but fully transparent
    with pytest.raises(InputError, match="^left_mask: the mask is empty"):
        check_mask(_rgba_png(tmp_path / "clear.png", rgba), "left_mask")


@pytest.mark.slow
def test_check_mask_of_a_large_mask_is_never_held_as_float(tmp_path):
    """20 MP black mask: the check's peak memory stays near the decoded uint8 picture (60 MB), far below
    the ~500 MB of converting it to float at once (measured in a fresh process)."""
    mask = png_bomb(tmp_path / "big.png", 5000, 4000)
    code = ("import resource, sys\nfrom infinitetalk.pipeline.masks import check_mask\nfrom infinitetalk.errors import InputError\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    check_mask(sys.argv[1])\nexcept InputError as exc:\n    assert 'empty' in str(exc), exc\n"
            "else:\n    raise SystemExit('not refused')\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code, str(mask)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) < 300, f"peak grew by {proc.stdout.split()[-1]} MB"


# -- 3. checkpoint headers that lie ----------------------------------------------------------------------
def _safetensors(path: Path, entries: dict, data: bytes) -> Path:
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


LIES = {
    "shape_text": ({"w": {"dtype": "F32", "shape": "abc", "data_offsets": [0, 8]}}, "shape 'abc'"),
    "shape_float": ({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 8]}}, r"shape \[1.5\]"),
    "shape_negative": ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, r"shape \[-2\]"),
    "shape_overflow": ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, "8 data bytes for shape"),
    "shape_huge_dim": ({"w": {"dtype": "F32", "shape": [2**70], "data_offsets": [0, 8]}}, "non-negative integers"),
    "offset_negative": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, r"data_offsets \[-8, 0\]"),
    "offset_past_end": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "truncated"),
    "size_mismatch": ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}, "8 data bytes for shape"),
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "safetensors library"),
    "not_object": ({"w": [1, 2]}, "not an object"),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_lying_checkpoint_header_is_a_checkpoint_error_naming_the_file(tmp_path, case):
    from infinitetalk.checkpoints.reader import open_checkpoint

    entries, message = LIES[case]
    path = _safetensors(tmp_path / f"{case}.safetensors", entries, bytes(8))
    with bounded(seconds=2.0, extra_kb=100 * 1024):
        with pytest.raises(CheckpointError, match=message) as info:
            open_checkpoint(path)
    assert str(path) in str(info.value)


def test_one_bad_checkpoint_does_not_break_discovery(tiny_models, tmp_path, caplog):
    from infinitetalk.checkpoints.detect import find_models
    from infinitetalk.pipeline.model_files import resolve_model_paths

    folder = tmp_path / "models"
    folder.mkdir()
    for sub in tiny_models.iterdir():
        (folder / sub.name).symlink_to(sub)
    bad = folder / "junk"
    bad.mkdir()
    _safetensors(bad / "liar.safetensors", LIES["shape_text"][0], bytes(8))
    (folder / "diffusion_models_extra").mkdir()
    with caplog.at_level(logging.WARNING, logger="infinitetalk.checkpoints.detect"):
        found = find_models(folder)
        paths = resolve_model_paths(folder, preset="quality")
    assert paths.vae.is_file() and paths.dit.exists()
    assert not any("liar" in str(p) for p in found.errors)         # only the standard folders are scanned …
    (folder / "vae").unlink()                                      # … so put the liar where the VAE lives
    (folder / "vae").mkdir()
    for f in (tiny_models / "vae").iterdir():
        (folder / "vae" / f.name).symlink_to(f)
    _safetensors(folder / "vae" / "liar.safetensors", LIES["offset_negative"][0], bytes(8))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="infinitetalk.checkpoints.detect"):
        found = find_models(folder)
        paths = resolve_model_paths(folder, preset="quality")
    liar = folder / "vae" / "liar.safetensors"
    assert liar in found.errors and "data_offsets" in found.errors[liar]
    assert paths.vae != liar and paths.vae.is_file()
    assert any("liar.safetensors" in r.getMessage() for r in caplog.records)


# -- 4. disk full -------------------------------------------------------------------------------------------
def _to_dev_full(path: Path) -> None:
    """Make writes to `path` hit a real ENOSPC (Linux /dev/full behind a symlink)."""
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/full")


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux /dev/full")


@needs_dev_full
def test_full_disk_while_saving_progress_keeps_the_job_resumable(tmp_path):
    from infinitetalk.pipeline.job import JobFolder, JobState

    job = JobFolder(tmp_path / "job")
    state = JobState(fingerprint="f", seed=1, windows_total=3)
    job.start(state)
    _to_dev_full(job.path / "tail_0000.tmp")
    with pytest.raises(OutOfSpace, match=rf"^disk: no space left on the device holding {job.path}.*tail_0000.pt"):
        job.save_tail(0, torch.zeros(2, 3, 4))
    assert not list(job.path.glob("*.tmp")) and not job.tail(0).exists()
    _to_dev_full(job.path / "state.json.tmp")
    with pytest.raises(OutOfSpace, match="state.json"):
        job.commit(JobState(fingerprint="f", seed=1, windows_total=3, windows_done=1))
    assert not list(job.path.glob("*.tmp"))
    assert job.load("f") == state                                      # the last committed state still stands
    job.save_tail(0, torch.ones(2, 3, 4))                              # space again: the job goes on
    assert torch.equal(job.load_tail(0), torch.ones(2, 3, 4))


@needs_dev_full
def test_full_disk_while_encoding_a_segment_leaves_no_partial_file(tmp_path):
    from infinitetalk.video.writer import Mp4Writer

    out = tmp_path / "segment_0000.mp4"
    _to_dev_full(tmp_path / ".segment_0000.partial.mp4")
    with pytest.raises(OutOfSpace, match=f"holding {tmp_path}"):
        with Mp4Writer(out, 32, 32, audio=(np.zeros((1, 16000), np.float32), 16000)) as w:
            w.write(np.zeros((25, 32, 32, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_full_disk_while_joining_names_the_output_folder(tmp_path, monkeypatch):
    from infinitetalk.video import segments
    from infinitetalk.video.writer import Mp4Writer

    with Mp4Writer(tmp_path / "seg.mp4", 32, 32) as w:
        w.write(np.zeros((5, 32, 32, 3), np.uint8))

    def full(segs, tmp, *rest):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segments, "_write", full)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(OutOfSpace, match=f"holding {out_dir}.*final.mp4"):
        segments.concat_segments([tmp_path / "seg.mp4"], out_dir / "final.mp4", frames=5)
    assert list(out_dir.iterdir()) == []


@pytest.mark.slow
def test_full_disk_mid_job_is_a_clear_error_and_the_same_job_resumes(tiny_models, good, tmp_path, monkeypatch):
    from infinitetalk.pipeline.generate import generate
    from infinitetalk.pipeline.models import load_models
    from infinitetalk.pipeline.request import GenerationRequest

    models = load_models(tiny_models, preset="quality", device="cpu", dtype="fp32")
    job_dir = tmp_path / "job"
    req = GenerationRequest(left_audio=good["left"], right_audio=good["right"], image=good["image"],
                            out=tmp_path / "o.mp4", order="left_right", seed=5, job_dir=job_dir, steps=1,
                            frame_num=21, motion_frames=5, size_scale=0.05)
    real_save, calls = torch.save, []

    def disk_fills_on_second_tail(obj, f, *a, **k):               # the job's tail files are its only torch.save
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a tail")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_fills_on_second_tail)
    with pytest.raises(OutOfSpace) as info:
        generate(req, models)
    assert isinstance(info.value, InputError) and str(job_dir) in str(info.value)   # the CLI prints it, exit 2
    assert not list(job_dir.glob("*.tmp")) and not list(job_dir.glob(".*partial*"))
    assert sorted(p.name for p in job_dir.iterdir()) == ["segment_0000.mp4", "segment_0001.mp4", "state.json",
                                                         "tail_0000.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    result = generate(req, models)
    assert result.resumed_windows == 1 and result.path.is_file()
