"""Image/video reading at 25 fps and the atomic mp4 writer (round trips through PyAV)."""
from __future__ import annotations

import math
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from infinitetalk.audio.io import AudioClip
from infinitetalk.errors import InputError
from infinitetalk.video.reader import VideoSource, load_image, load_image_with_alpha
from infinitetalk.video.writer import Mp4Writer, pick_video_encoder


def _code_frame(k: int, size: int = 64) -> np.ndarray:
    """A frame whose 8 vertical bars spell k in binary (survives lossy coding)."""
    img = np.zeros((size, size, 3), np.uint8)
    bar = size // 8
    for b in range(8):
        if k >> b & 1:
            img[:, b * bar:(b + 1) * bar] = 255
    return img


def _read_code(img: torch.Tensor) -> int:
    cols = img.float().mean(dim=(0, 2))
    bar = img.shape[1] // 8
    return sum(1 << b for b in range(8) if cols[b * bar + 2:(b + 1) * bar - 2].mean() > 127)


def _write_coded_video(path, n: int, fps: int, audio: bool = False):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        s.options = {"g": "12"}
        a = c.add_stream("aac", rate=16000, layout="mono") if audio else None
        for k in range(n):
            f = av.VideoFrame.from_ndarray(_code_frame(k), format="rgb24")
            f.pts, f.time_base = k, Fraction(1, fps)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
        if a is not None:
            x = (0.3 * np.sin(np.arange(16000 * n // fps) / 16000 * 2 * math.pi * 440)).astype(np.float32)
            for pos in range(0, len(x), 1024):
                f = av.AudioFrame.from_ndarray(x[None, pos:pos + 1024], format="fltp", layout="mono")
                f.sample_rate, f.pts, f.time_base = 16000, pos, Fraction(1, 16000)
                for p in a.encode(f):
                    c.mux(p)
            for p in a.encode(None):
                c.mux(p)


def test_encoder_choice():
    # PyAV's wheels ship libx264; a build without it falls back (with a warning) to another encoder
    want = "libx264" if "libx264" in av.codecs_available else None
    got = pick_video_encoder()
    assert got == want if want else got in ("libopenh264", "mpeg4")


def test_writer_roundtrip_frames_audio_metadata(tmp_path):
    sr = 44100
    t = torch.arange(sr * 5) / sr
    audio = AudioClip(torch.stack([torch.sin(2 * math.pi * 440 * t), torch.sin(2 * math.pi * 660 * t)]) * 0.3, sr)
    out = tmp_path / "sub" / "out.mp4"
    with Mp4Writer(out, 64, 48, audio=audio, metadata={"seed": 7, "prompt": "two people talk"}) as w:
        w.write(torch.rand(30, 48, 64, 3))                                  # float 0..1
        w.write(torch.randint(0, 256, (43, 48, 64, 3), dtype=torch.uint8))  # uint8
        assert not out.exists() and w.temp_path.exists()
    assert out.exists() and not w.temp_path.exists()
    with av.open(str(out)) as c:
        assert c.metadata["seed"] == "7" and c.metadata["prompt"] == "two people talk"
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert float(v.duration * v.time_base) == pytest.approx(73 / 25)
        assert abs(float(a.duration * a.time_base) - 73 / 25) <= 1024 / sr
        frames = list(c.decode(video=0))
        assert len(frames) == 73 and (frames[0].width, frames[0].height) == (64, 48)
    with av.open(str(out)) as c:
        samples = sum(f.samples for f in c.decode(audio=0))
    assert abs(samples / sr - 73 / 25) <= 1024 / sr


def test_writer_pads_short_audio_and_checks_sizes(tmp_path):
    with Mp4Writer(tmp_path / "a.mp4", 32, 32, audio=(torch.zeros(1, 800), 16000)) as w:
        w.write(np.zeros((50, 32, 32, 3), np.uint8))                        # 2 s of video, 0.05 s of audio
    with av.open(str(tmp_path / "a.mp4")) as c:
        a = c.streams.audio[0]
        assert abs(float(a.duration * a.time_base) - 2.0) <= 1024 / 16000
    with Mp4Writer(tmp_path / "r.mp4", 32, 32, audio=(torch.rand(1, 44000) * 0.1, 44000)) as w:
        w.write(np.zeros((25, 32, 32, 3), np.uint8))                        # AAC has no 44 kHz: resampled
    with av.open(str(tmp_path / "r.mp4")) as c:
        a = c.streams.audio[0]
        assert a.rate == 48000 and abs(float(a.duration * a.time_base) - 1.0) <= 1024 / 48000
    with pytest.raises(InputError, match="size"):
        Mp4Writer(tmp_path / "odd.mp4", 33, 32)
    w = Mp4Writer(tmp_path / "b.mp4", 32, 32)
    with pytest.raises(ValueError, match="32"):
        w.write(torch.zeros(1, 16, 16, 3, dtype=torch.uint8))
    w.abort()


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "x.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(out, 32, 32) as w:
            w.write(torch.zeros(5, 32, 32, 3, dtype=torch.uint8))
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    w = Mp4Writer(out, 32, 32)
    w.write(torch.zeros(3, 32, 32, 3, dtype=torch.uint8))
    w.abort()
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"previous result")                 # an old file is only replaced on success
    with pytest.raises(RuntimeError):
        with Mp4Writer(out, 32, 32):
            pass                                        # no frames: close fails
    assert out.read_bytes() == b"previous result" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("ext", ["mp4", "mkv"])             # mkv: no stream duration, ms timestamps
def test_fps_conversion_by_timestamp(tmp_path, ext):
    _write_coded_video(tmp_path / f"v30.{ext}", 90, 30)      # 3 s at 30 fps
    with VideoSource(tmp_path / f"v30.{ext}") as v:
        assert v.fps == 30 and v.num_frames == 75 and (v.width, v.height) == (64, 64)
        got = [_read_code(f) for f in v.frames(0, 75)]
        assert got == [(i * 30) // 25 for i in range(75)]   # the frame on screen at i/25 s
        # random access, backwards and far jumps (seek) agree with sequential decoding
        for i in (60, 3, 74, 10, 0, 40):
            assert _read_code(v.frame_at(i)) == (i * 30) // 25
        assert not v.has_audio


def test_pingpong_hold_and_slow_source(tmp_path):
    _write_coded_video(tmp_path / "v10.mp4", 10, 10, audio=True)    # 1 s at 10 fps -> 25 output frames
    with VideoSource(tmp_path / "v10.mp4") as v:
        assert v.num_frames == 25
        assert [v.source_index(i) for i in (24, 25, 26, 48, 49, 50)] == [24, 23, 22, 0, 1, 2]
        codes = [_read_code(f) for f in v.frames(20, 40)]
        want = [(v.source_index(i) * 10) // 25 for i in range(20, 60)]
        assert codes == want
        assert v.has_audio and abs(v.audio().duration - 1.0) < 0.08
    with VideoSource(tmp_path / "v10.mp4", extend="hold") as v:
        assert [_read_code(f) for f in v.frames(23, 4)] == [9, 9, 9, 9]


def test_images_rgba_and_bad_inputs(tmp_path):
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 25:, 3] = 255
    for name, codec, fmt in (("m.png", "png", "rgba"), ("m.webp", "libwebp", "yuva420p")):
        if codec not in av.codecs_available:
            continue
        with av.open(str(tmp_path / name), "w", format="image2") as c:
            s = c.add_stream(codec, rate=1)
            s.width, s.height, s.pix_fmt = 50, 40, fmt
            for p in s.encode(av.VideoFrame.from_ndarray(rgba, format="rgba").reformat(format=fmt)):
                c.mux(p)
            for p in s.encode(None):
                c.mux(p)
        rgb, alpha = load_image_with_alpha(tmp_path / name)
        assert rgb.shape == (40, 50, 3) and rgb.dtype == torch.uint8 and alpha is not None
        assert float(alpha[:, :20].float().mean()) < 20 and float(alpha[:, 30:].float().mean()) > 235
    with av.open(str(tmp_path / "p.jpg"), "w", format="image2") as c:
        s = c.add_stream("mjpeg", rate=1)
        s.width, s.height, s.pix_fmt = 64, 48, "yuvj420p"
        for p in s.encode(av.VideoFrame.from_ndarray(_code_frame(0b10110101, 64)[:48], format="rgb24").reformat(format="yuvj420p")):
            c.mux(p)
    img = load_image(tmp_path / "p.jpg")
    assert img.shape == (48, 64, 3) and _read_code(img) == 0b10110101
    assert load_image_with_alpha(tmp_path / "p.jpg")[1] is None

    with pytest.raises(InputError, match="image: file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really" * 10)
    with pytest.raises(InputError, match="image"):
        load_image(tmp_path / "junk.png")
    with av.open(str(tmp_path / "tiny.png"), "w", format="image2") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 1, 1, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((1, 1, 3), np.uint8), format="rgb24")):
            c.mux(p)
    with pytest.raises(InputError, match="at least 32"):
        load_image(tmp_path / "tiny.png")
    with av.open(str(tmp_path / "empty.mp4"), "w") as c:                 # a video stream with no frames
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 64
    with pytest.raises(InputError, match="video"):
        VideoSource(tmp_path / "empty.mp4", "video")
    with pytest.raises(InputError, match="extend"):
        VideoSource(tmp_path / "empty.mp4", extend="loop")


def test_display_rotation_and_still_image_as_source(tmp_path):
    with av.open(str(tmp_path / "rot.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)                      # phone-style: stored landscape, shown portrait
        img = np.zeros((32, 64, 3), np.uint8)
        img[:, :8] = 255                                # a bar at the stored left edge
        for k in range(2):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = k, Fraction(1, 25)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    with VideoSource(tmp_path / "rot.mp4") as v:
        assert (v.height, v.width) == (64, 32)
        frame = v.frame_at(0)
        assert frame.shape == (64, 32, 3)
        assert float(frame[-8:].float().mean()) > 200 and float(frame[:-8].float().mean()) < 30   # ccw: left -> bottom
    assert load_image(tmp_path / "rot.mp4").shape == (64, 32, 3)
    with av.open(str(tmp_path / "still.png"), "w", format="image2") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 64, 64, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(_code_frame(77), format="rgb24")):
            c.mux(p)
    with VideoSource(tmp_path / "still.png", "image") as v:
        assert v.num_frames == 1 and _read_code(v.frame_at(0)) == 77 and _read_code(v.frame_at(500)) == 77


def test_written_colours_survive_and_are_tagged_bt709(tmp_path):
    img = np.zeros((64, 64, 3), np.uint8)
    img[:32, :32], img[:32, 32:], img[32:, :32], img[32:, 32:] = [255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 150, 40]
    with Mp4Writer(tmp_path / "c.mp4", 64, 64, crf=0) as w:
        w.write(np.stack([img, img]))
    with av.open(str(tmp_path / "c.mp4")) as c:
        assert c.streams.video[0].codec_context.colorspace == 1          # BT.709
        frame = next(c.decode(video=0))
        out = frame.to_ndarray(format="rgb24").astype(int)
    for y, x in ((8, 8), (8, 40), (40, 8), (40, 40)):
        assert np.abs(out[y, x] - img[y, x]).max() <= 4


@pytest.mark.parametrize("width,height", [(32, 32), (96, 64), (192, 128)])
def test_writer_output_is_bit_reproducible(tmp_path, width, height):
    """Same frames -> same bytes (x264's AVX-512 kernels are kept out because they are not)."""
    rng = np.random.default_rng(1)
    base = (np.indices((height, width)).sum(0) * 3 % 255).astype(np.uint8)
    frames = np.stack([np.stack([np.roll(base, i, 1)] * 3, -1) + rng.integers(0, 8, (height, width, 3), dtype=np.uint8)
                       for i in range(21)])
    outs = set()
    for i in range(8):
        with Mp4Writer(tmp_path / f"r{i}.mp4", width, height) as w:
            w.write(frames)
        outs.add((tmp_path / f"r{i}.mp4").read_bytes())
    assert len(outs) == 1


def test_decoders_are_capped_at_max_pixels_even_when_headers_pass(tmp_path, monkeypatch):
    # headers can understate the frame size; the decoders themselves refuse frames over MAX_PIXELS
    import infinitetalk.video.reader as reader

    _write_coded_video(tmp_path / "v.mp4", 5, 25)
    png = tmp_path / "i.png"
    with av.open(str(png), "w", format="image2") as c:
        s = c.add_stream("png")
        s.width = s.height = 64
        s.pix_fmt = "rgb24"
        c.mux(s.encode(av.VideoFrame.from_ndarray(_code_frame(3), format="rgb24")))
        c.mux(s.encode(None))
    assert load_image(png).shape == (64, 64, 3) and VideoSource(tmp_path / "v.mp4").frame_at(0).shape == (64, 64, 3)
    monkeypatch.setattr(reader, "MAX_PIXELS", 64 * 64 - 1)          # the header probes still pass (limits.MAX_PIXELS)
    with pytest.raises(InputError, match=r"^video: .*\(MAX_PIXELS\)"):
        VideoSource(tmp_path / "v.mp4", "video")
    with pytest.raises(InputError, match=r"^image: .*\(MAX_PIXELS\)"):
        load_image(png, "image")


def test_output_audio_format_is_checked_before_model_work(monkeypatch):
    from infinitetalk.video import writer

    for rate, channels in ((192000, 2), (8000, 9), (44100, 1), (7350, 1)):
        writer.check_audio_encodes(rate, channels, "audio")                  # mixed down / resampled: encodable
    x, rate, layout = writer.aac_ready_audio(np.full((9, 1920), 0.25, np.float32), 192000)
    assert (x.shape, rate, layout) == ((2, 480), 48000, "stereo")
    monkeypatch.setattr(writer, "aac_output_format", lambda r, c: (5000, "stereo"))   # a rate AAC lacks
    with pytest.raises(InputError, match=r"^audio: the output audio .* cannot be encoded"):
        writer.check_audio_encodes(5000, 2, "audio")
