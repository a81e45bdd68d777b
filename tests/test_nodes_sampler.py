"""Model loader + sampler + video combine driven directly with the tiny models (no ComfyUI)."""
from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from infinitetalk.errors import InputError

PATCH = "tiny_wan2.1_infiniteTalk_multi_fp16.safetensors"
LOADER = {
    "diffusion_model": "tiny_wan2.1_i2v_480p_bf16.safetensors",
    "infinitetalk_patch": PATCH,
    "lora": "none",
    "lora_strength": 1.0,
    "audio_encoder": "wav2vec2-chinese-base_fp16.safetensors",
    "text_encoder": "umt5_xxl_fp16.safetensors",
    "clip_vision": "clip_vision_h.safetensors",
    "vae": "wan_2.1_vae.safetensors",
    "precision": "fp32",
    "offload": "off",
}
SAMPLER = {"prompt": "two people talking", "negative_prompt": "", "order": "left_right", "resolution": "480p",
           "seed": 3, "preset": "quality", "steps": 2, "text_guidance": 5.0, "audio_guidance": 4.0,
           "color_strength": 1.0, "size_scale": 0.05}


@pytest.fixture()
def env(custom_node_package, tiny_models, tmp_path):
    from infinitetalk_multi_pkg.nodes import bridge

    bridge.configure(models_dir=tiny_models, input_dir=tmp_path, output_dir=tmp_path / "output",
                     temp_dir=tmp_path / "temp")
    return custom_node_package.NODE_CLASS_MAPPINGS


def _audio(seconds: float, freq: float, rate: int = 16000) -> dict:
    t = torch.arange(int(seconds * rate)) / rate
    return {"waveform": (0.3 * torch.sin(2 * math.pi * freq * t))[None, None], "sample_rate": rate}


def test_loader_names_a_file_holding_another_model(env, tiny_models, tmp_path):
    from infinitetalk_multi_pkg.nodes import bridge, model_nodes

    (tmp_path / "m" / "vae").mkdir(parents=True)
    (tmp_path / "m" / "vae" / "looks_like_a_vae.safetensors").symlink_to(tiny_models / "clip_vision" / "clip_vision_h.safetensors")
    bridge.configure(models_dir=tmp_path / "m")
    path = model_nodes.resolve("vae", "looks_like_a_vae.safetensors")
    with pytest.raises(InputError, match="clip_vision checkpoint") as err:
        model_nodes.check_component("vae", path)
    assert err.value.input_name == "vae"


def test_loader_names_every_missing_file_with_its_folder_and_download(env):
    """Each file combo is checked on its own: no VALIDATE_INPUTS (ComfyUI would attach its one message to all seven
    inputs); a missing file's combo carries where it goes and its download link, and the loader names every one."""
    from infinitetalk_multi_pkg.nodes import model_nodes

    loader = env["InfiniteTalkModelLoader"]
    assert not hasattr(loader, "VALIDATE_INPUTS")
    types = loader.INPUT_TYPES()["required"]
    for role, url in model_nodes.DOWNLOADS.items():
        assert url in types[role][1]["missing"] and f"models/{model_nodes.ROLES[role][0][0]}" in types[role][1]["missing"]
    with pytest.raises(InputError) as err:
        loader().load(**dict(LOADER, diffusion_model="gone_dit.safetensors", vae="gone_vae.safetensors"))
    text = str(err.value)
    assert err.value.input_name == "diffusion_model, vae"
    assert "'gone_dit.safetensors'" in text and "models/diffusion_models" in text
    assert "'gone_vae.safetensors'" in text and model_nodes.DOWNLOADS["vae"] in text
    assert "clip_vision" not in err.value.input_name  # present files are not named


def test_loader_lists_checks_and_names_the_wrong_file(env):
    loader = env["InfiniteTalkModelLoader"]
    types = loader.INPUT_TYPES()["required"]
    assert PATCH in types["infinitetalk_patch"][0] and types["infinitetalk_patch"][0][0] == "none"
    assert types["lora"][0][0] == "none" and any("lightx2v" in n for n in types["lora"][0])
    assert "chinese-wav2vec2-base/model.safetensors" in types["audio_encoder"][0]  # wav2vec2/ folder too
    assert not any(n.endswith("config.json") for n in types["audio_encoder"][0])
    shard = "tiny_Wan2.1-I2V-14B-480P/diffusion_pytorch_model-00001-of-00003.safetensors"
    assert shard in types["diffusion_model"][0]  # the first shard stands for its whole sharded checkpoint
    assert not any("-00002-of-" in n for n in types["diffusion_model"][0])  # listed once
    (models,) = loader().load(**dict(LOADER, diffusion_model=shard))
    assert models.overrides["dit"].name == "diffusion_pytorch_model.safetensors.index.json"
    (models,) = loader().load(**LOADER)
    assert models.overrides["patch"].name == PATCH and models.overrides["loras"] == [] and not models.has_lora

    bad = dict(LOADER, vae="clip_vision_h.safetensors")
    with pytest.raises(InputError) as err:  # exists in no vae folder
        loader().load(**bad)
    assert err.value.input_name == "vae"
    with pytest.raises(InputError) as err:  # a base DiT without InfiniteTalk needs the patch
        loader().load(**dict(LOADER, infinitetalk_patch="none"))
    assert err.value.input_name == "infinitetalk_patch"
    with pytest.raises(InputError) as err:
        models.load("fast")  # fast preset without a distill LoRA
    assert err.value.input_name == "preset"


@pytest.fixture(scope="module")
def image_job(custom_node_package, tiny_models, tmp_path_factory):
    """ONE real tiny job (the expensive part of this file): image + InfiniteTalkMaskFromRegion masks, left_right."""
    from infinitetalk_multi_pkg.nodes import bridge

    root = tmp_path_factory.mktemp("image_job")
    bridge.configure(models_dir=tiny_models, input_dir=root, output_dir=root / "output", temp_dir=root / "temp")
    nodes = custom_node_package.NODE_CLASS_MAPPINGS
    (models,) = nodes["InfiniteTalkModelLoader"]().load(**LOADER)
    image = torch.rand(1, 64, 96, 3)
    masks = nodes["InfiniteTalkMaskFromRegion"]().make(image, "halves", 0.05, "", "")["result"]
    outputs = nodes["InfiniteTalkMultiSampler"]().generate(
        models, _audio(0.5, 200.0), _audio(0.3, 330.0, rate=22050), image=image, left_mask=masks[0],
        right_mask=masks[1], **SAMPLER)
    return nodes, outputs


def test_sampler_image_job_end_to_end(image_job, tmp_path):
    from infinitetalk_multi_pkg.nodes import bridge

    nodes, (video, frames, audio, core_video, fps, seed) = image_job
    # left_right: the tracks one after the other = 0.8 s = 20 frames at 25 fps
    assert fps == 25.0 and seed == 3 and video.seed == 3
    assert video.frames == 20 and video.seconds == pytest.approx(0.8) and video.has_audio
    assert frames.shape == (20, video.height, video.width, 3) and 0 <= float(frames.min()) <= float(frames.max()) <= 1
    assert audio["waveform"].shape[-1] / audio["sample_rate"] == pytest.approx(0.8, abs=0.05)
    assert str(core_video) == str(video.path) and video.path.is_file()
    with av.open(str(video.path)) as c:  # the IMAGE output matches the mp4 (up to h264 loss)
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert decoded.shape[0] == 20 and np.abs(decoded / 255.0 - frames.numpy()).mean() < 0.08

    bridge.configure(output_dir=tmp_path)
    saved = nodes["InfiniteTalkVideoCombine"]().combine("it/test", 25, 19, "yuv420p", True, video=video)
    with av.open(saved["result"][0]) as c:
        assert sum(1 for _ in c.decode(video=0)) == 20 and c.streams.audio


def _fake_generate(frames_per_window: int, windows: int, size=(16, 24), seed: int = 11):
    """A stand-in for the pipeline that calls the hooks like the real one and writes a real mp4."""
    from infinitetalk.pipeline.generate import GenerationResult
    from infinitetalk_multi_pkg.nodes import media

    def fake(request, models, progress=None, cancel=None, on_window=None, sampler=None):
        from infinitetalk.pipeline.progress import JobProgress

        fake.job_dirs.append(request.job_dir)
        h, w = size
        steps, chunks = 2, []
        tracker = JobProgress(progress, windows, steps, decode_units=1)
        tracker.start()
        tracker.advance("prepare")
        for k in range(windows):
            tracker.advance("encode")
            for s in range(steps):
                tracker.advance("steps")
                if cancel():
                    from infinitetalk.errors import JobCancelled
                    raise JobCancelled("cancelled")
            chunk = torch.full((frames_per_window, h, w, 3), 40 * k, dtype=torch.uint8)
            fake.windows += 1
            on_window(k, chunk)
            chunks.append(chunk.numpy())
            tracker.window_done(k)
        tracker.finish()
        n = frames_per_window * windows - 3  # the real loop trims the last window to the audio
        mix = (0.25 * np.sin(np.arange(n * 640, dtype=np.float32) * 0.05))[None]
        media.frames_to_mp4(np.concatenate(chunks)[:n], request.out, audio=(mix, 16000))
        return GenerationResult(path=request.out, frames=n, seconds=n / 25, seed=seed, width=w, height=h, windows=windows,
                                audio=(mix, 16000))

    fake.job_dirs, fake.windows = [], 0
    return fake


def test_sampler_frames_output_respects_the_limit(env, monkeypatch):
    import infinitetalk.pipeline.generate as gen

    sampler, image = env["InfiniteTalkMultiSampler"](), torch.rand(1, 64, 96, 3)
    fake = _fake_generate(8, 3)
    monkeypatch.setattr(gen, "generate", fake)
    models = object()  # the fake ignores models
    video, frames, audio, _, _, seed = sampler.generate(models, _audio(0.5, 200.0), _audio(0.5, 300.0),
                                                        image=image, **SAMPLER)
    assert seed == 11 and video.frames == 21 and frames.shape == (21, 16, 24, 3)
    # the AUDIO output is the placed mix itself (not the AAC in the mp4 decoded again)
    assert audio["sample_rate"] == 16000 and audio["waveform"].shape == (1, 1, 21 * 640)
    assert torch.equal(audio["waveform"][0, 0], torch.as_tensor(0.25 * np.sin(np.arange(21 * 640, dtype=np.float32) * 0.05)))
    assert float(frames[20, 0, 0, 0]) == pytest.approx(80 / 255) and float(frames[0, 0, 0, 0]) == 0.0
    # 25 frames (1 s of audio) of 16x24 float32 = 113 KiB: past a 0 MB limit the job stops at its first window
    windows = fake.windows
    with pytest.raises(InputError, match="raise frames_limit_mb to 1 or more") as err:
        sampler.generate(models, _audio(0.5, 200.0), _audio(0.5, 300.0), image=image, frames_limit_mb=0, **SAMPLER)
    assert err.value.input_name == "frames_limit_mb" and fake.windows == windows + 1
    # 'frames' not connected in the queued graph: nothing is kept, whatever the limit
    graph = {"7": {"inputs": {}}, "8": {"inputs": {"video": ["7", 0]}}}
    _, frames, _, _, _, _ = sampler.generate(models, _audio(0.5, 200.0), _audio(0.5, 300.0), image=image,
                                             frames_limit_mb=0, queued_graph=graph, unique_id="7", **SAMPLER)
    assert frames is None  # outside ComfyUI; inside, an ExecutionBlocker that explains itself
    graph["9"] = {"inputs": {"images": ["7", 1]}}  # connected: the frames come back
    _, frames, _, _, _, _ = sampler.generate(models, _audio(0.5, 200.0), _audio(0.5, 300.0), image=image,
                                             queued_graph=graph, unique_id="7", **SAMPLER)
    assert frames.shape == (21, 16, 24, 3)
    # the job folder is named by the job's content: the same job again resumes in the same folder
    sampler.generate(models, _audio(0.5, 200.0), _audio(0.5, 300.0), image=image, **dict(SAMPLER, seed=4))
    assert fake.job_dirs[0] == fake.job_dirs[1] != fake.job_dirs[-1]


def test_sampler_cancel_becomes_comfyui_interrupt(env, monkeypatch):
    import sys
    import types

    import infinitetalk.pipeline.generate as gen
    from infinitetalk.errors import JobCancelled

    class Interrupted(Exception):
        pass

    calls = {"n": 0}

    def processing_interrupted():
        calls["n"] += 1
        return calls["n"] >= 3

    def throw_exception_if_processing_interrupted():
        if processing_interrupted():
            raise Interrupted()

    fake_mm = types.SimpleNamespace(processing_interrupted=processing_interrupted, get_torch_device=lambda: "cpu",
                                    throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
                                    unload_all_models=lambda: None, soft_empty_cache=lambda: None)
    comfy = types.ModuleType("comfy")
    comfy.model_management = fake_mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", fake_mm)
    monkeypatch.setattr(gen, "generate", _fake_generate(8, 3))
    with pytest.raises(Interrupted):
        env["InfiniteTalkMultiSampler"]().generate(object(), _audio(0.5, 200.0), _audio(0.5, 300.0),
                                                   image=torch.rand(1, 8, 8, 3), **SAMPLER)
    assert calls["n"] >= 3
    monkeypatch.setattr(gen, "generate", lambda *a, **k: (_ for _ in ()).throw(JobCancelled("x")))
    calls["n"] = -100  # not interrupted by the user: the pipeline's own cancel propagates
    with pytest.raises(JobCancelled):
        env["InfiniteTalkMultiSampler"]().generate(object(), _audio(0.5, 200.0), _audio(0.5, 300.0),
                                                   image=torch.rand(1, 8, 8, 3), **SAMPLER)


def test_sampler_names_bad_inputs(env):
    (models,) = env["InfiniteTalkModelLoader"]().load(**LOADER)
    sampler = env["InfiniteTalkMultiSampler"]()
    image = torch.rand(1, 64, 96, 3)
    cases = [
        (dict(), "image/video"),                                              # neither image nor video
        (dict(image=image, video=image), "image/video"),                      # both
        (dict(image=image, left_mask=torch.ones(1, 64, 96)), "right_mask"),   # one speaker mask only
        (dict(image=image, left_mask=torch.zeros(1, 64, 96), right_mask=torch.ones(1, 64, 96)), "left_mask"),
    ]
    for extra, name in cases:
        with pytest.raises(InputError) as err:
            sampler.generate(models, _audio(0.5, 200.0), _audio(0.5, 300.0), **SAMPLER, **extra)
        assert err.value.input_name == name
    with pytest.raises(InputError) as err:
        sampler.generate(models, {"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}, _audio(0.5, 300.0),
                         image=image, **SAMPLER)
    assert err.value.input_name == "left_audio"


def test_loader_dropdowns_list_what_loads(env, tiny_models, tmp_path):
    """The patch dropdown holds InfiniteTalk files only (found by content), .gguf only where it loads."""
    from infinitetalk_multi_pkg.nodes import bridge, model_nodes

    models = tmp_path / "models"
    for folder in ("diffusion_models", "model_patches", "vae"):
        (models / folder).mkdir(parents=True)
    (models / "diffusion_models" / "base.safetensors").symlink_to(next(tiny_models.rglob(LOADER["diffusion_model"])))
    (models / "model_patches" / "renamed_patch.safetensors").symlink_to(next(tiny_models.rglob(PATCH)))
    (models / "model_patches" / "not_a_patch.safetensors").symlink_to(next(tiny_models.rglob(LOADER["vae"])))
    for folder in ("diffusion_models", "model_patches", "vae"):
        (models / folder / "weights.gguf").write_bytes(b"GGUF not really")
    bridge.configure(models_dir=models)
    assert model_nodes.choices("infinitetalk_patch") == ["none", "renamed_patch.safetensors"]
    if model_nodes.gguf_supported("infinitetalk_patch"):  # a real GGUF patch is listed, found by its tensors
        from safetensors.torch import load_file

        from infinitetalk.tiny.gguf import save_gguf

        save_gguf(load_file(str(next(tiny_models.rglob(PATCH)))), models / "model_patches" / "patch_Q8_0.gguf")
        assert model_nodes.choices("infinitetalk_patch") == ["none", "patch_Q8_0.gguf", "renamed_patch.safetensors"]
    dit = model_nodes.choices("diffusion_model")
    assert "base.safetensors" in dit and ("weights.gguf" in dit) == model_nodes.gguf_supported("diffusion_model")
    assert "weights.gguf" not in model_nodes.choices("vae")


def test_loader_carries_runtime_settings_to_load_models(env, monkeypatch):
    import infinitetalk.pipeline.models as pipeline_models
    from infinitetalk.ops.options import RuntimeOptions

    loader = env["InfiniteTalkModelLoader"]
    optional = loader.INPUT_TYPES()["optional"]
    assert optional["gpus"][1]["default"] == 1 and optional["vram_gb"][1]["default"] == 0.0
    (choice,) = loader().load(**LOADER, vram_gb=12.0, attention="math", fp8_matmul="off", compile=True, gpus=2)
    assert choice.runtime == RuntimeOptions(vram_gb=12.0, attention="math", fp8_matmul="off", compile=True)
    assert choice.gpus == 2
    (auto,) = loader().load(**LOADER)
    assert auto.runtime == RuntimeOptions() and auto.gpus == 1  # 0 GB = automatic
    for bad, name in ((dict(attention="fast"), "attention"), (dict(gpus=0), "gpus"), (dict(vram_gb=-1.0), "vram")):
        with pytest.raises(InputError) as err:
            loader().load(**LOADER, **bad)
        assert err.value.input_name == name
    seen = {}

    def fake_load_models(models_dir=None, preset="quality", device=None, dtype=None, overrides=None, offload=None,
                         runtime=None):
        seen.update(runtime=runtime, dtype=dtype, offload=offload)
        return "bundle"

    monkeypatch.setattr(pipeline_models, "load_models", fake_load_models)
    (one_gpu,) = loader().load(**LOADER, vram_gb=12.0, attention="math")  # gpus > 1: multigpu/workers.py's part
    assert one_gpu.load("quality") == "bundle" and one_gpu.load("quality") == "bundle"
    assert seen == {"runtime": one_gpu.runtime, "dtype": "fp32", "offload": False} and one_gpu.runtime.vram_gb == 12


def test_model_loading_shows_progress_text_on_the_node(env, monkeypatch):
    import sys
    import types

    import infinitetalk.pipeline.models as pipeline_models

    sent = []
    server = types.SimpleNamespace(instance=types.SimpleNamespace(send_progress_text=lambda t, n: sent.append((n, t))))
    running = types.SimpleNamespace(get_executing_context=lambda: types.SimpleNamespace(node_id="3"))
    for name, module in (("folder_paths", types.ModuleType("folder_paths")), ("comfy_execution.utils", running),
                         ("server", types.SimpleNamespace(PromptServer=server))):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(pipeline_models, "load_models", lambda *a, **k: "bundle")
    from infinitetalk_multi_pkg.nodes import model_nodes

    choice = model_nodes.ModelChoice(overrides={"dit": Path("/m/dit.safetensors"), "loras": []}, dtype=None,
                                     offload=None, has_lora=False)
    monkeypatch.setattr(model_nodes.bridge, "torch_device", lambda: "cpu")
    assert choice.load("quality") == "bundle"
    assert [n for n, _ in sent] == ["3", "3"]
    assert "Loading models" in sent[0][1] and "dit.safetensors" in sent[0][1] and "Models loaded in" in sent[1][1]


def test_loader_knows_the_distilled_dit_so_turbo_needs_no_lora(env):
    """The 4-step distilled DiT is recognised by its name (or dit_kind); turbo then runs without a LoRA;
    dit_kind 'base' says the file is a base DiT, and then turbo asks for the distill LoRA."""
    from infinitetalk.tiny.dit import DISTILLED_DIT

    loader = env["InfiniteTalkModelLoader"]
    distilled = f"tiny_{DISTILLED_DIT}-fp8.safetensors"
    assert distilled in loader.INPUT_TYPES()["required"]["diffusion_model"][0]
    assert loader.INPUT_TYPES()["optional"]["dit_kind"][0] == ["auto", "base", "distilled"]
    (models,) = loader().load(**dict(LOADER, diffusion_model=distilled))
    assert models.distilled and models.overrides["dit_kind"] == "distilled" and not models.has_lora
    bundle = models.load("turbo")
    assert bundle.paths.distilled and bundle.paths.loras == [] and bundle.dit.blocks[0].self_attn.q.weight.dtype == \
        torch.float8_e4m3fn
    (base,) = loader().load(**dict(LOADER, diffusion_model=distilled, dit_kind="base"))
    with pytest.raises(InputError, match="distilled DiT"):
        base.load("turbo")


def test_status_line_shows_window_step_eta_and_ends_on_the_outcome(env, monkeypatch):
    from infinitetalk.pipeline.progress import JobProgress
    from infinitetalk_multi_pkg.nodes.status import JobStatus

    clock = [50.0]
    monkeypatch.setattr("infinitetalk.pipeline.progress.time.perf_counter", lambda: clock[0])
    shown: list[str] = []
    status = JobStatus(shown.append)
    job = JobProgress(status, windows=3, steps=4, decode_units=2)
    job.start()
    assert shown[-1].startswith("window 1/3") and "preparing" in shown[-1] and "measuring" in shown[-1]
    for stage, seconds in (("prepare", 2.0), ("encode", 1.0), ("steps", 3.0)):
        clock[0] += seconds
        job.advance(stage)
    assert "window 1/3 · step 1/4 · sampling" in shown[-1] and "more than" in shown[-1]  # decode not timed yet
    for _ in range(3):
        clock[0] += 3.0
        job.advance("steps")
    clock[0] += 10.0
    job.advance("decode", 2)
    job.window_done(0)
    clock[0] += 1.0
    job.advance("encode")   # left: 1 encode (1 s) + 8 steps (3 s) + 4 decode units (5 s), every stage timed
    assert shown[-1] == "window 2/3 · step 0/4 · sampling · about 45 s left"
    status.cancelled(seed=-1)
    assert shown[-1] == ("Cancelled after window 1/3. Run again with seed -1 (set its control to 'fixed') "
                         "to resume from window 2.")
    status.failed(RuntimeError("boom"))
    assert shown[-1].startswith("Stopped by an error (windows 1-1 are kept") and shown[-1].endswith("boom")
    status.finished(frames=50, fps=25.0, seed=1234, seconds=75)
    assert shown[-1] == "Done: 50 frames (2.0 s of video), seed 1234, in 1 min 15 s"


def test_seed_minus_one_rerolls_every_run_and_the_node_ends_showing_the_seed(env, monkeypatch):
    import infinitetalk.pipeline.generate as gen
    from infinitetalk_multi_pkg.nodes import bridge

    sampler = env["InfiniteTalkMultiSampler"]
    changed = sampler.IS_CHANGED(seed=-1)
    assert changed != changed                                   # NaN: ComfyUI never serves it from its cache
    assert sampler.IS_CHANGED(seed=5) == sampler.IS_CHANGED(seed=5) != sampler.IS_CHANGED(seed=6)
    shown: list[str] = []
    monkeypatch.setattr(bridge, "progress_text", shown.append)
    monkeypatch.setattr(gen, "generate", _fake_generate(8, 2, seed=777))
    sampler().generate(object(), _audio(0.5, 200.0), _audio(0.5, 300.0), image=torch.rand(1, 8, 8, 3),
                       **dict(SAMPLER, seed=-1))
    assert any(t.startswith("window 2/2 · step 2/2") for t in shown)
    assert shown[-1].startswith("Done: 13 frames") and "seed 777" in shown[-1]

    monkeypatch.setattr(bridge, "interrupted", lambda: len(shown) > 7)   # Cancel pressed in window 2
    shown.clear()
    monkeypatch.setattr(gen, "generate", _fake_generate(8, 3))
    from infinitetalk.errors import JobCancelled

    with pytest.raises(JobCancelled):
        sampler().generate(object(), _audio(0.5, 200.0), _audio(0.5, 300.0), image=torch.rand(1, 8, 8, 3),
                           **dict(SAMPLER, seed=9))
    assert shown[-1].startswith("Cancelled after window 1/3. Run again with seed 9") and "window 2" in shown[-1]


def test_advanced_shift_denoise_and_teacache_reach_the_request_and_presets_come_from_the_data(env, monkeypatch):
    import infinitetalk.pipeline.generate as gen
    from infinitetalk.pipeline.request import PRESETS

    sampler = env["InfiniteTalkMultiSampler"]
    types = sampler.INPUT_TYPES()
    assert types["required"]["preset"][0] == list(PRESETS)
    for name, preset in PRESETS.items():   # the tooltip is written from the preset table
        assert f"{name}: {preset.steps} steps" in types["required"]["preset"][1]["tooltip"]
    for name, default in (("shift", 0.0), ("denoise", 1.0), ("teacache", 0.0)):
        assert types["optional"][name][1]["advanced"] and types["optional"][name][1]["default"] == default
    seen = []
    fake = _fake_generate(8, 1)
    monkeypatch.setattr(gen, "generate", lambda request, *a, **k: (seen.append(request), fake(request, *a, **k))[1])
    run = dict(SAMPLER, preset="quality", text_guidance=5.0)
    sampler().generate(object(), _audio(0.5, 200.0), _audio(0.5, 300.0), image=torch.rand(1, 8, 8, 3), **run)
    assert seen[-1].shift is None and seen[-1].teacache == 0.0 and seen[-1].denoise == 1.0   # the reference's
    sampler().generate(object(), _audio(0.5, 200.0), _audio(0.5, 300.0), image=torch.rand(1, 8, 8, 3),
                       shift=5.0, teacache=0.2, **run)
    assert seen[-1].shift == 5.0 and seen[-1].teacache == 0.2
    with pytest.raises(InputError) as err:   # a picture has no source motion to keep
        sampler().generate(object(), _audio(0.5, 200.0), _audio(0.5, 300.0), image=torch.rand(1, 8, 8, 3),
                           denoise=0.5, **run)
    assert err.value.input_name == "denoise"
    with pytest.raises(InputError) as err:   # the 2-call recipe cannot skip steps: said before any work
        sampler().generate(object(), _audio(0.5, 200.0), _audio(0.5, 300.0), image=torch.rand(1, 8, 8, 3),
                           teacache=0.2, **dict(run, text_guidance=1.0))
    assert err.value.input_name == "teacache"


def test_core_entry_sizes_and_lets_go_of_the_bundle(env):
    """The ModelPatcher look-alike core's memory manager sees (real-ComfyUI check: tests/comfyui/test_core_memory.py)."""
    (choice,) = env["InfiniteTalkModelLoader"]().load(**LOADER)
    assert choice.core_entry() is None                          # nothing loaded: nothing for core to manage
    bundle = choice.load("quality")
    entry = choice.core_entry()
    assert entry is choice.core_entry() and entry.model is bundle.dit
    size = sum(t.numel() * t.element_size() for m in bundle.modules().values() for t in [*m.parameters(), *m.buffers()])
    assert entry.model_size() == size and entry.loaded_size() == size   # CPU device: all of it is "loaded"
    assert entry.partially_load(bundle.device, 1e30) == 0 and choice.holds(bundle)
    entry.detach()                                              # core needs the memory: a CPU bundle is let go
    assert not choice.holds(bundle) and entry.loaded_size() == 0 and entry.partially_unload(bundle.device, 1) == 0
    again = choice.load("quality")
    assert again is not bundle and choice.core_entry() is not entry
