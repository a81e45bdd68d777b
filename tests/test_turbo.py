"""The `turbo` preset (issue 23): LightX2V's 4-step distilled InfiniteTalk, one DiT call per step.

Schedule by hand from LightX2V's scheduler (`InfiniteTalkScheduler.prepare`): `linspace(1000, 1, 4)` in float32,
`0` appended, each t mapped by `timestep_transform`: `1000·s·(t/1000) / (1 + (s−1)·(t/1000))`. Files: the
distilled DiT in bf16 and in LightX2V's fp8 layout, known by name or metadata or the user's `dit_kind`;
without it the base DiT + the lightx2v LoRA at 4 steps, guidance 1, said in the video's metadata.
"""
from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infinitetalk.checkpoints.detect import DIT_KINDS, find_models
from infinitetalk.cli import DIT_KINDS as CLI_DIT_KINDS, PRESET_NAMES
from infinitetalk.errors import InputError
from infinitetalk.loaders.dit import load_dit
from infinitetalk.pipeline.models import job_for, plan_from_files, resolve_model_paths
from infinitetalk.pipeline.request import PRESETS, GenerationRequest
from infinitetalk.pipeline.sampler import Guidance, sample_window
from infinitetalk.pipeline.schedule import timesteps
from infinitetalk.tiny.dit import DISTILLED_DIT
from test_pipeline_sampler import RecordingDiT, _cond, _v

BF16 = f"tiny_{DISTILLED_DIT}-bf16.safetensors"
FP8 = f"tiny_{DISTILLED_DIT}-fp8.safetensors"


def _by_hand(shift: int) -> list[float]:
    """LightX2V's four model times (and the final 0) in exact arithmetic: linspace(1000, 1, 4) = 1000, 667, 334, 1."""
    out = []
    for t in (1000, 667, 334, 1, 0):
        sigma = Fraction(t, 1000)
        out.append(float(1000 * shift * sigma / (1 + (shift - 1) * sigma)))
    return out


@pytest.mark.parametrize("resolution, shift", [("480p", 11), ("720p", 7)])
def test_turbo_schedule_is_lightx2vs_four_steps(resolution, shift):
    req = GenerationRequest(left_audio=Path("l.wav"), right_audio=Path("r.wav"), out=Path("o.mp4"),
                            image=Path("i.png"), preset="turbo", resolution=resolution).resolved()
    assert (req.steps, req.text_guidance, req.audio_guidance, req.shift) == (4, 1.0, 1.0, float(shift))
    got = timesteps(req.steps, req.shift).tolist()
    expected = _by_hand(shift)   # 480p: 1000, 956.5841, 846.5438, 10.8911, 0
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
    if shift == 11:
        assert got[1:4] == pytest.approx([956.58409, 846.54378, 10.89109], abs=1e-4)


def test_turbo_step_makes_exactly_one_dit_call_with_prompt_and_audio():
    cond = _cond()
    g = Guidance(1.0, 1.0)
    assert g.unguided and g.calls_per_step == 1 == job_for("turbo").calls_per_step
    dit = RecordingDiT()
    noise = torch.randn(16, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    times = timesteps(4, 11.0)
    out = sample_window(dit, noise, cond, times, g, torch.zeros(16, 1, 4, 6))
    assert len(dit.calls) == 4   # one call per step, no guidance pass
    assert all(torch.equal(c["context"], cond.context) and torch.equal(c["audio"], cond.audio) for c in dit.calls)
    x = noise.clone()
    x[:, :1] = 0
    for i in range(4):   # the Euler update on the conditional velocity alone
        x = x - _v(cond, x, times[i:i + 1], cond.context, cond.audio) * (float(times[i]) - float(times[i + 1])) / 1000
        x[:, :1] = 0
    torch.testing.assert_close(out, x)


def test_guidance_values_decide_the_calls_and_presets_reach_every_entry_point():
    assert [Guidance(*v).calls_per_step for v in ((5.0, 4.0), (1.0, 2.0), (1.0, 1.0), (2.0, 1.0))] == [3, 2, 1, 3]
    assert PRESET_NAMES == tuple(PRESETS) and CLI_DIT_KINDS == DIT_KINDS   # the CLI's copies (no torch at --help)


def test_turbo_picks_the_distilled_dit_and_other_presets_never_do(tiny_models):
    turbo = resolve_model_paths(tiny_models, "turbo")
    assert turbo.dit.name == BF16 and turbo.distilled and turbo.loras == []   # bf16 before fp8
    assert "multi" in str(turbo.patch)   # the multi adapter over it, as LightX2V loads it
    for preset in ("quality", "fast"):
        paths = resolve_model_paths(tiny_models, preset)
        assert not paths.distilled and "4StepDistill" not in paths.dit.name
    base = resolve_model_paths(tiny_models, "turbo", {"dit_kind": "base"})
    assert not base.distilled and [p.name for p, _ in base.loras] == [
        "tiny_lightx2v_I2V_14B_480p_cfg_step_distill_rank4_bf16.safetensors"]
    with pytest.raises(InputError, match="dit_kind"):
        resolve_model_paths(tiny_models, "turbo", {"dit_kind": "turbo"})


def test_without_the_distilled_file_turbo_uses_the_lightx2v_lora_else_says_what_to_get(tiny_models, tmp_path):
    tree = tmp_path / "models"
    shutil.copytree(tiny_models, tree, ignore=shutil.ignore_patterns("*4StepDistill*"))
    paths = resolve_model_paths(tree, "turbo")
    assert not paths.distilled and "lightx2v" in paths.loras[0][0].name
    shutil.rmtree(tree / "loras")
    with pytest.raises(InputError, match="4StepDistill"):
        resolve_model_paths(tree, "turbo")


def test_recognised_by_metadata_or_the_users_word_when_the_name_says_nothing(tiny_models, tmp_path):
    src = tiny_models / "diffusion_models" / BF16
    plain = tmp_path / "my_dit.safetensors"
    shutil.copy(src, plain)
    assert not resolve_model_paths(tiny_models, "turbo", {"dit": plain, "loras": [(src, 1.0)]}).distilled
    assert resolve_model_paths(tiny_models, "turbo", {"dit": plain, "dit_kind": "distilled"}).distilled
    tagged = tmp_path / "tagged" / "diffusion_models" / "model.safetensors"
    tagged.parent.mkdir(parents=True)
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(src)), str(tagged), metadata={**meta, "infinitetalk.dit_kind": "distilled"})
    assert find_models(tmp_path / "tagged").distilled == {tagged}
    named = tiny_models / "diffusion_models" / BF16   # a name says distilled, metadata may say otherwise
    renamed = tmp_path / "tagged" / "diffusion_models" / BF16
    save_file(load_file(str(named)), str(renamed), metadata={**meta, "infinitetalk.dit_kind": "base"})
    assert renamed not in find_models(tmp_path / "tagged").distilled


def test_distilled_dit_loads_from_bf16_and_lightx2v_fp8_alike(tiny_models):
    patch = resolve_model_paths(tiny_models, "turbo").patch
    bf16 = load_dit(tiny_models / "diffusion_models" / BF16, patch, dtype=torch.float32)
    fp8 = load_dit(tiny_models / "diffusion_models" / FP8, patch, dtype=torch.float32)
    base = load_dit(tiny_models / "diffusion_models" / "tiny_wan2.1_i2v_480p_fp32.safetensors", patch,
                    dtype=torch.float32)
    q = "blocks.0.self_attn.q.weight"
    assert fp8.state_dict()[q].dtype == torch.float8_e4m3fn and bf16.state_dict()[q].dtype == torch.float32
    ref = bf16.blocks[0].self_attn.q.weight.float()
    got = fp8.blocks[0].self_attn.q.dequantized_weight(torch.float32)   # fp8 × the per-row weight_scale
    assert fp8.blocks[0].self_attn.q.weight_scale.shape == (ref.shape[0], 1)
    assert float((got - ref).norm() / ref.norm()) < 0.08   # e4m3 rounding, not a wrong scale
    assert not torch.equal(ref, base.blocks[0].self_attn.q.weight.float())   # other weights than the base DiT
    torch.testing.assert_close(fp8.audio_proj.proj1.weight, bf16.audio_proj.proj1.weight)   # one adapter


def test_plan_knows_the_distilled_dit_and_one_call(tiny_models, tmp_path):
    plan = plan_from_files(tiny_models, "turbo", device="cpu", dtype=torch.float32)
    assert plan.job.calls_per_step == 1 and "step-distilled DiT" in plan.label
    tree = tmp_path / "models"
    shutil.copytree(tiny_models, tree, ignore=shutil.ignore_patterns("*4StepDistill*"))
    fallback = plan_from_files(tree, "turbo", device="cpu", dtype=torch.float32)
    assert "base DiT + LoRA" in fallback.label and fallback.job.calls_per_step == 1


def _comment(path: Path) -> dict:
    with av.open(str(path)) as c:
        return json.loads(c.metadata["comment"])


def _media(tmp_path: Path, seconds: float) -> dict:
    from infinitetalk.audio.io import write_wav
    from infinitetalk.demo import synthetic_voice, two_faces_image, write_png

    return dict(left_audio=write_wav(tmp_path / "l.wav", synthetic_voice(seconds, 120.0, 16000, 1)[None], 16000),
                right_audio=write_wav(tmp_path / "r.wav", synthetic_voice(seconds, 200.0, 16000, 2)[None], 16000),
                image=write_png(tmp_path / "two.png", two_faces_image(64, 96)))


def _turbo(media: dict, out: Path, **kw) -> GenerationRequest:
    return GenerationRequest(out=out, preset="turbo", seed=3, size_scale=0.05, frame_num=21, motion_frames=5,
                             order="left_right", **media, **kw)


@pytest.mark.parametrize("distilled", [True, False], ids=["distilled-dit", "lora-fallback"])
def test_turbo_video_says_which_distillation_ran_and_resumes_byte_identical(tiny_models, tmp_path, distilled):
    from infinitetalk.errors import JobCancelled
    from infinitetalk.pipeline.generate import generate
    from infinitetalk.pipeline.models import load_models

    tree = tiny_models
    if not distilled:
        tree = tmp_path / "models"
        shutil.copytree(tiny_models, tree, ignore=shutil.ignore_patterns("*4StepDistill*"))
    models = load_models(tree, preset="turbo", device="cpu", dtype="fp32")
    calls = []
    forward = models.dit.forward
    models.dit.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    media = _media(tmp_path, 0.6)
    result = generate(_turbo(media, tmp_path / "a.mp4"), models)
    assert result.windows == 2 and len(calls) == 4 * result.windows   # 4 steps, one DiT call each, per window
    meta = _comment(result.path)
    assert (meta["preset"], meta["steps"], meta["text_guidance"], meta["audio_guidance"], meta["shift"]) == \
        ("turbo", 4, 1.0, 1.0, 11.0)
    assert meta["model"]["dit_kind"] == ("distilled" if distilled else "base")
    assert bool(meta["model"]["loras"]) is not distilled
    if not distilled:
        assert "lightx2v" in meta["model"]["loras"][0][0]
        return
    # stopped after the first window, then resumed: the same file, byte for byte
    req = _turbo(media, tmp_path / "b.mp4", job_dir=tmp_path / "job")
    infos = []
    with pytest.raises(JobCancelled):
        generate(req, models, progress=lambda d, t, info: infos.append(info),
                 cancel=lambda: bool(infos) and infos[-1].window >= 1)
    assert not req.out.exists()
    resumed = generate(req, models)
    assert resumed.resumed_windows == 1 and resumed.path.read_bytes() == result.path.read_bytes()


def test_cli_plan_takes_turbo_and_the_dit_kind(tiny_models, capsys):
    from infinitetalk.cli import main

    assert main(["plan", "--models", str(tiny_models), "--preset", "turbo", "--vram", "100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["job"]["calls_per_step"] == 1 and "step-distilled DiT" in plan["label"]
    assert main(["plan", "--models", str(tiny_models), "--preset", "turbo", "--dit-kind", "base", "--vram", "100"]) == 0
    assert "base DiT + LoRA" in capsys.readouterr().out


def test_a_distilled_file_with_audio_weights_gets_the_multi_adapter_over_them(tiny_models, tmp_path):
    """LightX2V always loads its adapter file over the distilled DiT; a distilled file that carries audio
    weights of its own is used alone only when no InfiniteTalk patch is found."""
    from infinitetalk.tiny.dit import METADATA, tiny_state

    patch_file = resolve_model_paths(tiny_models, "turbo").patch
    _, other = tiny_state(seed=21)   # audio weights unlike the patch's
    combined = {**load_file(str(tiny_models / "diffusion_models" / BF16)),
                **{k: v for k, v in other.items() if k.startswith("audio_proj.") or ".audio_cross_attn." in k
                   or ".norm_x." in k}}
    tree = tmp_path / "models"
    shutil.copytree(tiny_models, tree, ignore=shutil.ignore_patterns("*4StepDistill*"))
    save_file(combined, str(tree / "diffusion_models" / f"{DISTILLED_DIT}-bf16.safetensors"), metadata=METADATA)
    paths = resolve_model_paths(tree, "turbo")
    assert paths.distilled and paths.patch is not None and paths.patch.name == patch_file.name
    with_patch = load_dit(paths.dit, paths.patch, dtype=torch.float32)
    alone = load_dit(paths.dit, None, dtype=torch.float32)
    patch_w = load_file(str(paths.patch))
    key = next(k for k in patch_w if k.endswith("audio_proj.proj1.weight"))
    torch.testing.assert_close(with_patch.audio_proj.proj1.weight, patch_w[key].float())
    assert not torch.equal(alone.audio_proj.proj1.weight, with_patch.audio_proj.proj1.weight)
