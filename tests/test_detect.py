"""Component detection from tensor names/shapes (never file names), models-tree scanning and `pick`."""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from safetensors.torch import save_file

from infinitetalk.checkpoints import CheckpointError
from infinitetalk.checkpoints.detect import COMPONENTS, detect_component, find_models, pick
from infinitetalk.errors import InputError
from infinitetalk.tiny import COMPONENTS as TINY_COMPONENTS, make_tiny_models
from infinitetalk.tiny.dit import tiny_state
from infinitetalk.tiny.layouts import save_fp8_comfy_quant, save_pth, save_safetensors

FOLDER_COMPONENT = {"diffusion_models": "dit", "unet": "dit", "model_patches": "infinitetalk", "loras": "lora",
                    "audio_encoders": "wav2vec2", "wav2vec2": "wav2vec2", "text_encoders": "t5", "clip": "t5",
                    "clip_vision": "clip_vision", "vae": "vae"}
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@pytest.fixture(scope="module")
def models(request, tmp_path_factory):
    """The shared tiny models tree; only the tiny components that exist yet when some are missing."""
    available = [c for c in TINY_COMPONENTS if importlib.util.find_spec(f"infinitetalk.tiny.{c}") is not None]
    if len(available) == len(TINY_COMPONENTS):
        return request.getfixturevalue("tiny_models")
    root = tmp_path_factory.mktemp("partial_models")
    make_tiny_models(root, seed=0, components=tuple(available))
    return root


def _entry_points(root):
    """Checkpoint files and sharded-set indexes (shards themselves excluded)."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.name.endswith(".safetensors.index.json"):
            out.append(p)
        elif p.is_file() and p.name.endswith(SUFFIXES) and not any(p.parent.glob("*.safetensors.index.json")):
            out.append(p)
    return out


def test_every_tiny_file_is_detected_by_its_folder_role(models):
    seen = set()
    for path in _entry_points(models):
        folder = path.relative_to(models).parts[0]
        expected = FOLDER_COMPONENT[folder]
        assert detect_component(path) == expected, path
        seen.add(expected)
    assert {"dit", "infinitetalk", "lora"} <= seen


def test_detection_ignores_file_names(models, tmp_path):
    for path in _entry_points(models):
        if path.name.endswith(".index.json"):
            continue
        fake = tmp_path / ("wan2.1_i2v_480p_14B_bf16" + path.suffix)  # a misleading name
        shutil.copyfile(path, fake)
        assert detect_component(fake) == FOLDER_COMPONENT[path.relative_to(models).parts[0]]


def test_combined_dit_with_infinitetalk_and_prefixes(tmp_path):
    _, state = tiny_state(seed=1)
    full = save_fp8_comfy_quant(state, tmp_path / "a.safetensors", prefix="model.diffusion_model.",
                                linear_names=[k for k in state if k.endswith("q.weight")])
    assert detect_component(full) == "dit+infinitetalk"
    assert detect_component(save_pth(state, tmp_path / "b.pth", wrapper="state_dict")) == "dit+infinitetalk"
    patch = {k: v for k, v in state.items() if k.startswith("audio_proj.") or ".audio_cross_attn." in k or ".norm_x." in k}
    assert detect_component(save_safetensors(patch, tmp_path / "c.safetensors", prefix="diffusion_model.")) == "infinitetalk"


def test_other_component_name_schemes(tmp_path):
    def write(name, keys, shapes=None):
        save_file({k: torch.zeros(*(shapes or {}).get(k, (1,))) for k in keys}, str(tmp_path / name))
        return detect_component(tmp_path / name)

    assert write("w.safetensors", ["wav2vec2.feature_extractor.conv_layers.0.conv.weight",
                                   "wav2vec2.encoder.layers.0.attention.q_proj.weight", "quantizer.codevectors"]) == "wav2vec2"
    assert write("hf_t5.safetensors", ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"]) == "t5"
    assert write("wan_t5.safetensors", ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight"]) == "t5"
    assert write("hf_clip.safetensors", ["vision_model.embeddings.patch_embedding.weight",
                                         "vision_model.encoder.layers.0.mlp.fc1.weight"]) == "clip_vision"
    assert write("open_clip.safetensors", ["visual.patch_embedding.weight", "textual.token_embedding.weight",
                                           "textual.blocks.0.attn.q.weight", "log_scale"]) == "clip_vision"
    five_d = {k: (1, 1, 1, 1, 1) for k in ("encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight", "conv2.weight")}
    assert write("vae.safetensors", list(five_d), five_d) == "vae"
    assert write("other.safetensors", ["model.layers.0.mlp.up_proj.weight"]) == "unknown"
    assert write("t2v.safetensors", ["patch_embedding.weight", "head.head.weight", "blocks.0.cross_attn.k.weight"],
                 {"patch_embedding.weight": (4, 16, 1, 2, 2)}) == "unknown"  # text-to-video DiT: not usable


def test_detect_reads_headers_only(tmp_path):
    # a file whose tensor data is garbage still detects: only names and shapes are looked at
    path = save_safetensors({"audio_proj.proj1.weight": torch.zeros(4, 4),
                             "blocks.0.audio_cross_attn.q_linear.weight": torch.zeros(4, 4)}, tmp_path / "p.safetensors")
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8
    path.write_bytes(bytes(data))
    assert detect_component(path) == "infinitetalk"
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        (tmp_path / "broken.safetensors").write_bytes(data[:20])
        detect_component(tmp_path / "broken.safetensors")


def test_find_models_and_pick(models):
    found = find_models(models)
    assert found.errors == {}
    assert found.unknown == []
    total = sum(len(found.of(c)) for c in COMPONENTS)
    assert total == len(_entry_points(models))
    dit = pick(found, "dit")
    assert found.precision[dit] == "fp32"  # highest precision first, then alphabetical
    fp32 = [p for p in found.dit if found.precision[p] == "fp32"]
    assert dit == sorted(fp32, key=lambda p: p.relative_to(models).parts)[0]
    assert all(found.precision[p] != "other" for c in COMPONENTS for p in found.of(c))
    bf16 = pick(found, "dit", prefer="tiny_wan2.1_i2v_480p_bf16.safetensors")
    assert bf16.name == "tiny_wan2.1_i2v_480p_bf16.safetensors"
    assert pick(found, "dit", prefer="tiny_wan2.1_i2v_480p_bf16") == bf16  # stem
    assert pick(found, "dit", prefer=str(bf16)) == bf16  # full path
    assert pick(found, "infinitetalk", prefer="KJ").name.endswith("_KJ.safetensors")  # unique substring
    with pytest.raises(InputError, match="nothing_like_this"):
        pick(found, "dit", prefer="nothing_like_this")
    with pytest.raises(InputError, match="several"):
        pick(found, "dit", prefer="fp8")
    assert pick(found, "dit+infinitetalk") is None
    with pytest.raises(InputError):
        found.of("unet")


def test_find_models_reports_bad_files_and_scans_flat_folders(tmp_path):
    _, state = tiny_state(seed=2)
    base = {k: v for k, v in state.items() if "audio" not in k and ".norm_x." not in k}
    save_safetensors(base, tmp_path / "sub" / "deep" / "b.safetensors", dtype=torch.bfloat16)
    save_safetensors(base, tmp_path / "a.safetensors", dtype=torch.float16)
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    (tmp_path / "readme.txt").write_text("ignored")
    found = find_models(tmp_path)  # no ComfyUI sub-folders: the root is scanned
    assert [p.name for p in found.dit] == ["a.safetensors", "b.safetensors"]
    assert list(found.errors) == [tmp_path / "junk.safetensors"] and "junk.safetensors" in found.errors[tmp_path / "junk.safetensors"]
    assert pick(found, "dit").name == "b.safetensors"  # bf16 beats fp16
    with pytest.raises(InputError, match="models"):
        find_models(tmp_path / "missing")
