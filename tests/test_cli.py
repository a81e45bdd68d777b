"""`python -m infinitetalk generate` / `demo`: arguments, progress bar, errors, model discovery by content."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
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
    assert frames == 30 and meta["seed"] == 4 and meta["preset"] == "fast" and meta["text_guidance"] == 1.0
    assert "2/2 steps" in captured.err                                # progress bar over windows x steps
    assert str(out) in captured.out


def test_fast_preset_without_distill_lora_names_the_file_to_get(tiny_models, tmp_path):
    from infinitetalk.pipeline.model_files import resolve_model_paths

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
    assert "100%" in buf.getvalue() and "#" * 10 in buf.getvalue() and buf.getvalue().endswith("\n")


def test_progress_bar_eta_is_measured_per_stage_and_a_lower_bound_until_every_stage_ran(monkeypatch):
    """1 of 2 windows left: 1 encode + 4 steps + 2 decode units; steps take 1 s, decode units 5 s."""
    import io

    from infinitetalk.pipeline.progress import JobProgress

    clock = [100.0]
    monkeypatch.setattr("infinitetalk.cli.time.perf_counter", lambda: clock[0])
    buf = io.StringIO()
    bar = ProgressBar("x", stream=buf, width=10)
    job = JobProgress(bar, windows=2, steps=4, decode_units=2, resumed=1)
    assert job.total == 2 + 2 * 7 and job.done == 7
    job.start()
    assert "resuming: 1 of 2 windows" in buf.getvalue()

    def tick(seconds: float, stage: str) -> str:
        clock[0] += seconds
        job.advance(stage)
        return buf.getvalue().rsplit("\r", 1)[-1]

    tick(3.0, "prepare")
    tick(2.0, "encode")
    line = tick(1.0, "steps")
    assert "window 2/2 steps" in line and "eta >3s" in line          # 3 steps left at 1 s; decode not timed yet
    for _ in range(3):
        line = tick(1.0, "steps")
    assert "eta ?" in line                                            # only untimed work left
    line = tick(5.0, "decode")
    assert "eta 5s" in line and ">" not in line                       # every stage with work left is timed
    job.window_done(1)
    job.finish()
    assert buf.getvalue().endswith("\n") and "100%" in buf.getvalue()


def test_stereo_conversation_file_drives_both_speakers(tiny_models, inputs, tmp_path, capsys):
    """Left channel = left person, right channel = right person, placed meanwhile; the mp4 keeps the stereo."""
    rate = 16000
    left = synthetic_voice(0.6, 120.0, rate, seed=1)
    right = np.zeros_like(left)
    right[rate // 4:] = synthetic_voice(0.35, 200.0, rate, seed=2)
    stereo = write_wav(tmp_path / "talk.wav", np.stack([left, right]), rate)
    out = tmp_path / "stereo.mp4"
    rc = main(["generate", "--models", str(tiny_models), "--image", inputs["image"], "--stereo-audio", str(stereo),
               "--out", str(out), "--seed", "2", "--quiet", *SMALL])
    assert rc == 0, capsys.readouterr().err
    frames, meta = _read(out)
    assert frames == 15 and meta["order"] == "meanwhile"              # 0.6 s at 25 fps: one common timeline
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.channels == 2

    mono = write_wav(tmp_path / "mono.wav", left[None], rate)
    rc = main(["generate", "--models", str(tmp_path / "absent"), "--image", inputs["image"], "--stereo-audio",
               str(mono), "--out", str(tmp_path / "m.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "stereo_audio" in err and "exactly 2" in err
    rc = main(["generate", "--models", str(tmp_path / "absent"), "--image", inputs["image"], "--stereo-audio",
               str(stereo), "--left-audio", inputs["left"], "--out", str(tmp_path / "m.mp4")])
    assert rc == 2 and "not both" in capsys.readouterr().err


def test_stereo_split_places_each_channel_on_its_speaker():
    import torch

    from infinitetalk.audio.io import AudioClip
    from infinitetalk.audio.stereo import place_stereo

    rate = 16000
    samples = torch.zeros(2, rate)
    samples[0, : rate // 2] = 0.5                                      # left talks first half
    samples[1, rate // 2:] = -0.25                                     # right talks second half
    placement = place_stereo(AudioClip(samples, rate))
    left, right = placement.tracks
    assert placement.frames == 25 and placement.order == "meanwhile"
    assert left[: rate // 2 - 50].abs().min() > 0.4 and left[rate // 2 + 50:].abs().max() < 1e-3
    assert right[: rate // 2 - 50].abs().max() < 1e-3 and right[rate // 2 + 50:].abs().min() > 0.2
    assert torch.equal(placement.mix.samples, samples)                # the file's own stereo goes into the mp4
    with pytest.raises(InputError, match="identical"):
        place_stereo(AudioClip(samples[:1].repeat(2, 1), rate))


def test_prompt_per_window(tiny_models, inputs, tmp_path, capsys, monkeypatch):
    """Successive windows are sampled with successive prompts (the last repeating), each distinct prompt is
    encoded once, and the output's metadata records them."""
    import torch

    from infinitetalk.pipeline import generate as generate_mod
    from infinitetalk.text.encoder import TextEncoder

    embeddings, contexts = {}, []
    encode, sample = TextEncoder.encode, generate_mod.sample_window
    monkeypatch.setattr(TextEncoder, "encode", lambda self, p: embeddings.setdefault(p, []).append(encode(self, p))
                        or embeddings[p][-1])
    monkeypatch.setattr(generate_mod, "sample_window", lambda dit, noise, cond, *a, **k: (
        contexts.append(cond.context.clone()), sample(dit, noise, cond, *a, **k))[1])
    out = tmp_path / "prompts.mp4"
    rc = main(["generate", "--models", str(tiny_models), "--image", inputs["image"], "--left-audio", inputs["left"],
               "--right-audio", inputs["right"], "--out", str(out), "--seed", "9", "--quiet", *SMALL,
               "--prompt", "A man talks.", "--prompt", "A woman laughs.\nA woman laughs."])
    assert rc == 0, capsys.readouterr().err
    assert _read(out)[1]["prompts"] == ["A man talks.", "A woman laughs.", "A woman laughs."]
    first, second = embeddings["A man talks."], embeddings["A woman laughs."]
    assert len(first) == len(second) == 1                             # each distinct prompt encoded once
    assert len(contexts) == 2 and not torch.equal(first[0], second[0])
    assert torch.equal(contexts[0], first[0]) and torch.equal(contexts[1], second[0])


def test_inputs_are_checked_once_per_job(tiny_models, inputs, tmp_path, capsys, monkeypatch):
    """The CLI checks the inputs before loading the models and hands the result to generate (no second read)."""
    from infinitetalk.pipeline import generate as generate_mod
    from infinitetalk.pipeline import inputs as inputs_mod

    calls, prepare = [], inputs_mod.prepare_inputs
    counted = lambda req: calls.append(req.out) or prepare(req)   # noqa: E731
    monkeypatch.setattr(inputs_mod, "prepare_inputs", counted)
    monkeypatch.setattr(generate_mod, "prepare_inputs", counted)
    out = tmp_path / "once.mp4"
    rc = main(["generate", "--models", str(tiny_models), "--image", inputs["image"], "--left-audio", inputs["left"],
               "--right-audio", inputs["right"], "--out", str(out), "--quiet", *SMALL])
    assert rc == 0, capsys.readouterr().err
    assert calls == [out] and out.is_file()


def test_window_prompts_repeat_the_last_line():
    from infinitetalk.text.prompts import join_prompts, prompt_for_window, window_prompts

    prompts = window_prompts("one\n\n two \n")
    assert prompts == ["one", "two"] and [prompt_for_window(prompts, k) for k in range(4)] == ["one", "two", "two", "two"]
    assert window_prompts("single") == ["single"] and join_prompts(["a", " b "]) == "a\nb"
    with pytest.raises(InputError, match="prompt"):
        join_prompts(["a", "b\nc"])


def test_denoise_reaches_the_request_and_a_picture_is_refused_before_model_work(inputs, tmp_path, capsys):
    from infinitetalk.cli import _request_from_args

    base = ["generate", "--models", str(tmp_path / "absent"), "--left-audio", inputs["left"], "--right-audio",
            inputs["right"], "--out", str(tmp_path / "x.mp4")]
    assert _request_from_args(build_parser().parse_args(base + ["--video", "v.mp4", "--denoise", "0.6"])).denoise == 0.6
    assert _request_from_args(build_parser().parse_args(base + ["--image", inputs["image"]])).denoise == 1.0
    rc = main(base + ["--image", inputs["image"], "--denoise", "0.5"])   # a picture has no motion to keep
    err = capsys.readouterr().err
    assert rc == 2 and "denoise:" in err and "video" in err and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_unwritable_out_and_models_folder_are_input_errors_before_model_work(inputs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = main(["generate", "--models", str(tmp_path / "absent"), "--image", inputs["image"], "--left-audio",
               inputs["left"], "--right-audio", inputs["right"], "--out", str(blocker / "x.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "out:" in err and "Traceback" not in err
    assert main(["make-tiny-models", str(blocker / "models")]) == 2
    assert "dir:" in capsys.readouterr().err


def test_full_size_on_cpu_warns_and_names_size_scale(inputs, tmp_path, capsys):
    rc = main(["generate", "--models", str(tmp_path / "absent"), "--image", inputs["image"], "--left-audio",
               inputs["left"], "--right-audio", inputs["right"], "--out", str(tmp_path / "x.mp4"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "--size-scale" in err and "CPU" in err         # warned, then the missing models folder


def test_demo_writes_a_real_mp4(tiny_models, tmp_path, capsys):
    cache = _linked_models(tiny_models, tmp_path / "cache")
    (cache / ".complete").write_text("")
    out = tmp_path / "demo.mp4"
    rc = main(["demo", "--out", str(out), "--cache", str(cache), "--seconds", "1.2", "--frame-num", "21",
               "--motion-frames", "5", "--steps", "1", "--size-scale", "0.05", "--quiet"])
    assert rc == 0
    frames, meta = _read(out)
    assert frames == 30 and meta["seed"] == 0


@pytest.mark.parametrize("argv, field", [
    (["--order", "both"], "order"),
    (["--seed", "abc"], "seed"),
    (["--video", "v.mp4"], "video"),   # with --image below: the two sources exclude each other
])
def test_a_wrong_choice_is_one_error_line_naming_the_field(argv, field, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--image", "x.png", "--out", "o.mp4", *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {field}: "), err   # no usage block before it
    assert "usage:" not in err


def test_unreadable_and_folder_inputs_are_said_in_words(tiny_models, inputs, tmp_path, capsys):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all")
    base = ["generate", "--models", str(tiny_models), "--out", str(tmp_path / "o.mp4"), *SMALL]
    assert main([*base, "--image", inputs["image"], "--left-audio", str(junk), "--right-audio", inputs["right"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: left_audio: ") and "not an audio or video file" in err and "Errno" not in err
    assert main([*base, "--image", str(junk), "--left-audio", inputs["left"], "--right-audio", inputs["right"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: image: ") and "not an image file" in err and "Errno" not in err
    assert main([*base, "--image", str(tmp_path), "--left-audio", inputs["left"], "--right-audio", inputs["right"]]) == 2
    assert "is a folder; expected a file" in capsys.readouterr().err


def test_plan_on_a_machine_without_gpu_says_so_and_sizes_read_width_by_height(tiny_models, capsys, monkeypatch):
    import re

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main(["plan", "--models", str(tiny_models), "--preset", "quality"])
    captured = capsys.readouterr()
    assert "no CUDA GPU on this machine" in captured.err and "memory plan on" not in captured.out
    from infinitetalk.pipeline.models import job_for

    job = job_for("quality", "480p", 81)
    assert re.search(rf"window {job.width}x{job.height} px", captured.out)   # width x height, as every other line


def test_every_demo_option_has_help():
    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    for action in demo._actions:
        assert action.help, action.dest
