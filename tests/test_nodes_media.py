"""Node classes without models, driven directly (no ComfyUI): audio loading, masks, video combine, schema."""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from infinitetalk.audio.io import write_wav
from infinitetalk.errors import InputError

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


@pytest.fixture()
def pkg(custom_node_package, tmp_path):
    """The node package with its standalone folders pointed at a fresh tmp tree."""
    from infinitetalk_multi_pkg.nodes import bridge

    for d in ("input", "output", "temp", "models"):
        (tmp_path / d).mkdir()
    bridge.configure(models_dir=tmp_path / "models", input_dir=tmp_path / "input", output_dir=tmp_path / "output",
                     temp_dir=tmp_path / "temp")
    return custom_node_package


def _tone(path, seconds: float, rate: int = 22050, channels: int = 1, freq: float = 220.0):
    t = np.arange(int(seconds * rate)) / rate
    samples = np.stack([0.3 * np.sin(2 * math.pi * freq * (c + 1) * t) for c in range(channels)]).astype(np.float32)
    write_wav(path, samples, rate)
    return samples


def _nodes(pkg):
    return pkg.NODE_CLASS_MAPPINGS


# -- schema ------------------------------------------------------------------------------------------
def test_every_node_declares_the_classic_api_with_tooltips(pkg):
    assert set(pkg.NODE_CLASS_MAPPINGS) == set(pkg.NODE_DISPLAY_NAME_MAPPINGS)
    assert pkg.WEB_DIRECTORY == "./web"
    for name, cls in pkg.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "InfiniteTalk", name
        assert cls.DESCRIPTION and callable(getattr(cls(), cls.FUNCTION)), name
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES), name
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), name
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for inp, spec in types.get(section, {}).items():
                assert len(spec) == 2 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert pkg.NODE_CLASS_MAPPINGS["InfiniteTalkVideoCombine"].OUTPUT_NODE is True


def test_node_modules_import_nothing_from_comfyui_at_import_time():
    """Module-level imports only: ComfyUI services are reached lazily, through nodes/bridge.py."""
    import ast
    from pathlib import Path

    comfy_modules = {"folder_paths", "comfy", "comfy_api", "comfy_extras", "comfy_execution", "server", "nodes",
                     "latent_preview", "node_helpers", "execution"}
    for path in sorted((Path(__file__).resolve().parents[1] / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text())
        for stmt in tree.body:
            if isinstance(stmt, ast.Import):
                names = [a.name for a in stmt.names]
            elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0:
                names = [stmt.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in comfy_modules, f"{path.name} imports {name} at module level"


def test_sampler_exposes_hosted_parameter_names(pkg):
    types = _nodes(pkg)["InfiniteTalkMultiSampler"].INPUT_TYPES()
    inputs = {**types["required"], **types["optional"]}
    for name in ("image", "video", "left_audio", "right_audio", "mask_image", "prompt", "order", "resolution", "seed"):
        assert name in inputs, name
    assert inputs["order"][0] == ["meanwhile", "left_right", "right_left"]
    assert inputs["resolution"][0] == ["480p", "720p"]
    seed = inputs["seed"][1]
    assert seed["min"] == -1 and seed["max"] == 2**31 - 1 and seed["control_after_generate"]
    assert 0 < inputs["size_scale"][1]["min"] and inputs["size_scale"][1]["default"] == 1.0


# -- LoadTwoAudios ------------------------------------------------------------------------------------
def test_load_two_audios_from_files_and_overrides(pkg, tmp_path):
    node = _nodes(pkg)["InfiniteTalkLoadTwoAudios"]
    left = _tone(tmp_path / "input" / "left.wav", 1.5, rate=22050, channels=2)
    _tone(tmp_path / "input" / "right.wav", 0.5, rate=16000)
    (tmp_path / "input" / "notes.txt").write_text("x")
    listed = node.INPUT_TYPES()["required"]["left_audio"]
    assert listed[0] == ["left.wav", "right.wav"] and listed[1]["audio_upload"] is True
    assert node.VALIDATE_INPUTS("left.wav", "right.wav") is True

    la, ra, ls, rs = node().load("left.wav", "right.wav")
    assert la["waveform"].shape == (1, 2, 33075) and la["sample_rate"] == 22050
    assert ra["sample_rate"] == 16000 and ra["waveform"].shape[:2] == (1, 1)
    assert ls == pytest.approx(1.5) and rs == pytest.approx(0.5)
    assert np.abs(la["waveform"][0].numpy() - left).max() < 1e-3  # 16-bit wav round trip

    override = {"waveform": torch.zeros(1, 1, 8000) + 0.1, "sample_rate": 8000}
    la2, ra2, ls2, rs2 = node().load("left.wav", "", right_audio_override=override)
    assert ls2 == pytest.approx(1.5) and rs2 == pytest.approx(1.0) and ra2["sample_rate"] == 8000


def test_load_two_audios_names_the_bad_input(pkg, tmp_path):
    node = _nodes(pkg)["InfiniteTalkLoadTwoAudios"]
    _tone(tmp_path / "input" / "left.wav", 0.5)
    (tmp_path / "input" / "broken.wav").write_bytes(b"RIFF....not audio")
    msg = node.VALIDATE_INPUTS("left.wav", "missing.wav")
    assert isinstance(msg, str) and msg.startswith("right_audio")
    with pytest.raises(InputError) as err:
        node().load("left.wav", "broken.wav")
    assert err.value.input_name == "right_audio"
    with pytest.raises(InputError) as err:
        node().load("", "left.wav")
    assert err.value.input_name == "left_audio"


def test_load_two_audios_splits_a_stereo_conversation(pkg, tmp_path):
    node = _nodes(pkg)["InfiniteTalkLoadTwoAudios"]
    t = torch.arange(16000) / 16000
    left, right = torch.sin(2 * np.pi * 220 * t), 0.5 * torch.sin(2 * np.pi * 330 * t)
    stereo = {"waveform": torch.stack([left, right])[None], "sample_rate": 16000}
    la, ra, ls, rs = node().load("", "", stereo_audio=stereo)   # overrides both file choices
    assert la["waveform"].shape == (1, 1, 16000) and ra["waveform"].shape == (1, 1, 16000)
    assert torch.allclose(la["waveform"][0, 0], left) and torch.allclose(ra["waveform"][0, 0], right)
    assert ls == pytest.approx(1.0) and rs == pytest.approx(1.0)
    with pytest.raises(InputError) as err:   # a mono recording saved as stereo cannot tell the speakers apart
        node().load("", "", stereo_audio={"waveform": torch.stack([left, left])[None], "sample_rate": 16000})
    assert err.value.input_name == "stereo_audio"


# -- MaskFromRegion -----------------------------------------------------------------------------------
def test_mask_from_region_modes_and_preview(pkg):
    node = _nodes(pkg)["InfiniteTalkMaskFromRegion"]()
    image = torch.full((1, 40, 100, 3), 0.5)
    out = node.make(image, "halves", 0.1, "", "")
    left, right, bg, preview = out["result"]
    shown = out["ui"]["images"][0]   # the node shows its own preview (the templates have no Preview Image)
    assert shown["type"] == "temp" and (pkg.nodes.bridge.temp_dir() / shown["subfolder"] / shown["filename"]).is_file()
    assert left.shape == right.shape == bg.shape == (1, 40, 100) and preview.shape == (1, 40, 100, 3)
    assert left[0, 20, 10] == 1 and left[0, 20, 80] == 0 and right[0, 20, 80] == 1
    assert torch.all((left + right + bg) <= 1)  # disjoint classes
    p = preview[0]
    assert p[20, 10, 0] > p[20, 10, 2] and p[20, 80, 2] > p[20, 80, 0]  # left red, right blue
    assert p[0, 0].max() < 0.5 * 0.5 + 1e-6  # background dimmed

    left, right, _, _ = node.make(image, "x_ranges", 0.0, "0,30", "70,100")["result"]
    assert left[0, :, :30].all() and not left[0, :, 30:].any() and right[0, :, 70:].all()
    left, right, _, _ = node.make(image, "boxes", 0.0, "10,5,20,15", "60,0,90,40")["result"]
    assert left[0].sum() == 100 and left[0, 5, 10] == 1 and left[0, 15, 10] == 0  # x = column, y = row
    painted = torch.zeros(1, 40, 100)
    painted[:, 10:30, 20:40] = 1
    painted[:, 10:30, 60:80] = 1
    left, right, _, _ = node.make(image, "mask", 0.0, "", "", mask=painted)["result"]
    assert left[0].sum() == 400 and right[0].sum() == 400


def test_mask_from_region_names_the_bad_input(pkg):
    node = _nodes(pkg)["InfiniteTalkMaskFromRegion"]()
    image = torch.zeros(1, 32, 32, 3)
    for args, name in ((("x_ranges", 0.0, "10", "50,90"), "left_region"),
                       (("boxes", 0.0, "0,0,10,10", "a,b,c,d"), "right_region"),
                       (("mask", 0.0, "", ""), "mask")):
        with pytest.raises(InputError) as err:
            node.make(image, *args)
        assert err.value.input_name == name
    with pytest.raises(InputError, match="empty"):
        node.make(image, "mask", 0.0, "", "", mask=torch.zeros(1, 32, 32))


# -- InfiniteTalkVideoCombine --------------------------------------------------------------------------
def _probe(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = sum(1 for _ in c.decode(video=0))
        audio = c.streams.audio[0] if c.streams.audio else None
        return frames, (v.codec_context.width, v.codec_context.height), v.codec_context.name, (
            None if audio is None else (audio.codec_context.name, float(audio.duration * audio.time_base)))


def test_video_combine_images_audio_counter_and_ui(pkg, tmp_path):
    node = _nodes(pkg)["InfiniteTalkVideoCombine"]()
    images = torch.rand(30, 33, 49, 3)  # odd size: cropped to even for yuv420p
    audio = {"waveform": torch.zeros(1, 1, 16000) + 0.05, "sample_rate": 16000}  # 1.0 s = 25 frames
    out = node.combine("talk/clip", 25, 19, "yuv420p", True, images=images, audio=audio,
                       prompt={"1": {"class_type": "X"}}, extra_pnginfo={"workflow": {"nodes": []}})
    item = out["ui"]["images"][0]
    assert item["type"] == "output" and item["subfolder"] == "talk" and item["filename"] == "clip_00001_.mp4"
    assert out["ui"]["animated"] == (True,)
    frames, size, vcodec, aud = _probe(out["result"][0])
    assert frames == 25 and size == (48, 32) and vcodec == "h264"
    assert aud[0] == "aac" and aud[1] == pytest.approx(1.0, abs=0.05)

    with av.open(out["result"][0]) as c:  # the graph travels in the mp4 like core SaveVideo's
        assert json.loads(c.metadata["prompt"]) == {"1": {"class_type": "X"}} and "workflow" in c.metadata

    out2 = node.combine("talk/clip", 25, 19, "yuv444p", False, images=images, audio=audio)
    assert out2["ui"]["images"][0]["filename"] == "clip_00002_.mp4"
    frames, size, _, aud = _probe(out2["result"][0])
    assert frames == 30 and size == (49, 33) and aud[1] == pytest.approx(1.2, abs=0.05)  # audio padded


def test_video_combine_streams_an_infinitetalk_video(pkg, tmp_path):
    from infinitetalk_multi_pkg.nodes import media
    from infinitetalk_multi_pkg.nodes.types import InfiniteTalkVideo

    src = tmp_path / "src.mp4"
    frames = (np.random.default_rng(0).random((40, 32, 48, 3)) * 255).astype(np.uint8)
    media.frames_to_mp4(frames, src, audio=(np.zeros((1, 32000), np.float32), 16000))
    video = InfiniteTalkVideo.from_file(src, seed=7)
    assert (video.frames, video.width, video.height, video.fps, video.has_audio) == (40, 48, 32, 25.0, True)
    assert video.seconds == pytest.approx(1.6) and video.get_stream_source() == str(src)
    node = _nodes(pkg)["InfiniteTalkVideoCombine"]()
    graph = {"prompt": {"1": {"class_type": "InfiniteTalkMultiSampler"}}, "extra_pnginfo": {"workflow": {"nodes": [1]}}}
    copied = node.combine("it", 25, 19, "yuv420p", True, video=video, **graph)["result"][0]
    with av.open(str(src)) as a, av.open(copied) as b:   # no re-encode when nothing changes: the same packets
        assert [bytes(p) for p in a.demux() if p.dts is not None] == [bytes(p) for p in b.demux() if p.dts is not None]
        # ... and the graph travels in it (drag the mp4 back into ComfyUI), as on the re-encoding path
        assert json.loads(b.metadata["prompt"]) == graph["prompt"]
        assert json.loads(b.metadata["workflow"]) == {"nodes": [1]}
    bare = node.combine("bare", 25, 19, "yuv420p", True, video=video, embed_workflow=False, **graph)["result"][0]
    with av.open(bare) as b:   # switched off (the hosted API's graphs do): no graph in the file
        assert "prompt" not in b.metadata and "workflow" not in b.metadata
    short = {"waveform": torch.zeros(1, 2, 8000), "sample_rate": 16000}  # 0.5 s
    n, size, _, aud = _probe(node.combine("it", 25, 19, "yuv420p", True, video=video, audio=short)["result"][0])
    assert n == 13 and size == (48, 32) and aud[1] == pytest.approx(0.52, abs=0.05)
    with pytest.raises(InputError) as err:
        node.combine("it", 25, 19, "yuv420p", True)
    assert err.value.input_name == "images/video"


def test_video_combine_decimal_fps_h265_and_10_bit(pkg, tmp_path):
    from infinitetalk_multi_pkg.nodes.types import InfiniteTalkVideo

    node = _nodes(pkg)["InfiniteTalkVideoCombine"]()
    images = torch.rand(6, 64, 96, 3)
    out = node.combine("hevc/clip", 29.97, 23, "yuv420p10le", True, codec="h265", images=images)
    assert out["ui"]["images"][0]["format"] == "video/h265-mp4"
    with av.open(out["result"][0]) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "hevc" and stream.codec_context.pix_fmt == "yuv420p10le"
        assert stream.average_rate == Fraction(2997, 100) and sum(1 for _ in c.decode(video=0)) == 6
    # asking for another format than the sampler's h264 yuv420p re-encodes its video instead of copying it
    video = InfiniteTalkVideo.from_file(Path(out["result"][0]))
    again = node.combine("hevc/again", 25, 19, "yuv420p", True, video=video)["result"][0]
    assert _probe(again)[2] == "h264"
    tiny = dict(codec="h265", images=images[:, :32, :48])  # libx265 breaks below one 64-pixel block
    for bad, name in ((dict(codec="av1"), "codec"), (dict(fps=0.5), "fps"), (tiny, "codec")):
        args = dict(filename_prefix="x", fps=25, crf=19, pix_fmt="yuv420p", trim_to_audio=True, images=images) | bad
        with pytest.raises(InputError) as err:
            node.combine(**args)
        assert err.value.input_name == name


def test_bridge_standalone_folders(pkg, tmp_path):
    from infinitetalk_multi_pkg.nodes import bridge

    (tmp_path / "models" / "loras" / "sub").mkdir(parents=True)
    (tmp_path / "models" / "loras" / "sub" / "a.safetensors").write_bytes(b"x")
    (tmp_path / "models" / "loras" / "readme.txt").write_text("x")
    assert bridge.list_models("loras") == ["sub/a.safetensors"]
    assert bridge.model_path("loras", "sub/a.safetensors") == tmp_path / "models" / "loras" / "sub" / "a.safetensors"
    assert bridge.model_path("loras", "nope.safetensors") is None
    assert not bridge.in_comfyui() and not bridge.interrupted()
    bar = bridge.Progress(10)
    bar.update(3)
    bar.preview(np.zeros((4, 4, 3), np.uint8))
    assert (bar.value, bar.total) == (3, 10)


def test_video_combine_fps_retimes_a_connected_video_frame_exact_with_its_audio(pkg, tmp_path):
    """fps applies to the sampler's video too: same length, each output frame the source frame on screen then."""
    from infinitetalk_multi_pkg.nodes import media
    from infinitetalk_multi_pkg.nodes.types import InfiniteTalkVideo

    src = tmp_path / "src.mp4"
    frames = np.zeros((50, 32, 48, 3), np.uint8)
    frames[:, :, :] = (np.arange(50) * 5)[:, None, None, None]   # frame k is grey 5k: which frame is which
    media.frames_to_mp4(frames, src, crf=0, audio=(np.zeros((1, 32000), np.float32), 16000))   # 2.0 s at 25 fps
    video = InfiniteTalkVideo.from_file(src)
    node = _nodes(pkg)["InfiniteTalkVideoCombine"]()
    out = node.combine("retime", 30, 0, "yuv444p", True, video=video)["result"][0]
    with av.open(out) as c:
        stream = c.streams.video[0]
        greys = [int(f.to_ndarray(format="rgb24")[16, 24, 0]) for f in c.decode(video=0)]
        assert stream.average_rate == 30 and c.streams.audio
    assert len(greys) == 60                                            # 2.0 s at 30 fps
    expected = [5 * math.floor(i * 25 / 30 + 1e-9) for i in range(60)]
    assert max(abs(g - e) for g, e in zip(greys, expected)) <= 2       # frame-exact (up to yuv rounding)
    n, _, _, aud = _probe(out)
    assert aud[1] == pytest.approx(2.0, abs=0.05)                      # the audio keeps its length: still in sync


@pytest.mark.parametrize("codec, container, stream, pix_fmt, audio_codec", [
    ("vp9", "webm", "vp9", "yuv420p", "opus"),
    ("prores", "mov", "prores", "yuv422p10le", "aac"),
    ("gif", "gif", "gif", None, None),
])
def test_video_combine_webm_prores_and_gif(pkg, codec, container, stream, pix_fmt, audio_codec):
    from infinitetalk_multi_pkg.nodes import media
    from infinitetalk_multi_pkg.nodes.types import InfiniteTalkVideo

    src = pkg.nodes.bridge.temp_dir() / "src.mp4"
    frames = (np.random.default_rng(1).random((25, 64, 96, 3)) * 255).astype(np.uint8)
    media.frames_to_mp4(frames, src, audio=(np.zeros((1, 16000), np.float32) + 0.05, 16000))   # 1.0 s, 25 fps
    node = _nodes(pkg)["InfiniteTalkVideoCombine"]()
    out = node.combine("formats/clip", 25, 30, "yuv420p", True, codec=codec, video=InfiniteTalkVideo.from_file(src),
                       prompt={"1": {"class_type": "X"}})
    path = Path(out["result"][0])
    assert path.suffix == f".{container}" and out["ui"]["images"][0]["filename"] == path.name
    with av.open(str(path)) as c:
        assert container in c.format.name and c.streams.video[0].codec_context.name == stream
        assert pix_fmt is None or c.streams.video[0].codec_context.pix_fmt == pix_fmt
        assert sum(1 for _ in c.decode(video=0)) == 25
        assert [a.codec_context.name for a in c.streams.audio] == ([audio_codec] if audio_codec else [])
