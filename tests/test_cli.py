"""`python -m infinitetalk generate` / `demo`: arguments, progress bar, errors, model discovery by content."""
from __future__ import annotations

import json
from pathlib import Path

import av
import pytest

from infinitetalk.audio.io import write_wav
from infinitetalk.cli import ProgressBar, build_parser, main
from infinitetalk.demo import synthetic_voice, two_faces_image, write_png
from infinitetalk.errors import InputError

SMALL = ["--frame-num", "21", "--motion-frames", "5", "--size-scale", "0.05", "--steps", "1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli_inputs")
    return {
        "image": str(write_png(d / "two.png", two_faces_image(128, 192))),
        "left": str(write_wav(d / "l.wav", synthetic_voice(0.6, 120.0, 16000, seed=1)[None], 16000)),
        "right": str(write_wav(d / "r.wav", synthetic_voice(0.6, 200.0, 16000, seed=2)[None], 16000)),
    }


def _linked_models(tiny_models: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    dest.mkdir()
    for sub in tiny_models.iterdir():
        if sub.name not in skip:
            (dest / sub.name).symlink_to(sub)
    return dest


def _read(path: Path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0)), json.loads(c.metadata["comment"])


def test_generate_fast_preset_finds_models_and_distill_lora_by_content(tiny_models, inputs, tmp_path, capsys):
    out = tmp_path / "fast.mp4"
    rc = main(["generate", "--models", str(tiny_models), "--image", inputs["image"], "--left-audio", inputs["left"],
               "--right-audio", inputs["right"], "--out", str(out), "--preset", "fast", "--seed", "4", *SMALL])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    frames, meta = _read(out)
    assert frames == 30 and meta["seed"] == 4 and meta["preset"] == "fast" and meta["text_scale"] == 1.0
    assert "2/2 steps" in captured.err                                # progress bar over windows x steps
    assert str(out) in captured.out


def test_fast_preset_without_distill_lora_names_the_file_to_get(tiny_models, tmp_path):
    from infinitetalk.pipeline.models import resolve_model_paths

    folder = _linked_models(tiny_models, tmp_path / "models", skip=("loras",))
    with pytest.raises(InputError, match="lightx2v"):
        resolve_model_paths(folder, preset="fast")
    paths = resolve_model_paths(folder, preset="quality")
    assert paths.loras == [] and paths.vae.is_file() and paths.dit.exists()


def test_bad_input_is_reported_before_models_load(inputs, tmp_path, capsys):
    missing_models = tmp_path / "no_models_here"
    rc = main(["generate", "--models", str(missing_models), "--image", inputs["image"], "--left-audio",
               str(tmp_path / "missing.wav"), "--right-audio", inputs["right"], "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "left_audio" in err and "not found" in err
    assert not (tmp_path / "x.mp4").exists()


def test_parser_requires_exactly_one_picture():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--image", "a.png", "--video", "b.mp4", "--left-audio", "l",
                                   "--right-audio", "r", "--out", "o.mp4"])


def test_progress_bar_draws_on_the_given_stream():
    import io

    buf = io.StringIO()
    bar = ProgressBar("x", stream=buf, width=10)
    for d in range(5):
        bar(d, 4)
    assert "4/4 steps" in buf.getvalue() and "#" * 10 in buf.getvalue()


def test_demo_writes_a_real_mp4(tiny_models, tmp_path, capsys):
    cache = _linked_models(tiny_models, tmp_path / "cache")
    (cache / ".complete").write_text("")
    out = tmp_path / "demo.mp4"
    rc = main(["demo", "--out", str(out), "--cache", str(cache), "--seconds", "1.2", "--frame-num", "21",
               "--motion-frames", "5", "--steps", "1", "--size-scale", "0.05", "--quiet"])
    assert rc == 0
    frames, meta = _read(out)
    assert frames == 30 and meta["seed"] == 0
