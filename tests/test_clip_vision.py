"""CLIP vision encoder: file layouts agree, penultimate-block output, preprocessing, head count, errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from infinitetalk.errors import CheckpointError
from infinitetalk.loaders.clip_vision import load_clip_vision
from infinitetalk.parity.runner import rel_l2
from infinitetalk.tiny import make_tiny_models
from infinitetalk.tiny import clip_vision as tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipmodels")
    make_tiny_models(root, seed=0, components=("clip_vision",))
    return root / "clip_vision"


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 90, 150, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _open_clip_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The visual tower under open_clip's own names (as in open_clip_pytorch_model.bin)."""
    dim = sd["pos_embedding"].shape[-1]
    out = {"visual.conv1.weight": sd["patch_embedding.weight"],
           "visual.class_embedding": sd["cls_embedding"].reshape(dim),
           "visual.positional_embedding": sd["pos_embedding"].reshape(-1, dim),
           "visual.proj": sd["head"]}
    for p in ("weight", "bias"):
        out[f"visual.ln_pre.{p}"] = sd[f"pre_norm.{p}"]
        out[f"visual.ln_post.{p}"] = sd[f"post_norm.{p}"]
    for i in range(tiny_clip.TINY_CLIP_CONFIG.num_layers):
        a, b = f"transformer.{i}.", f"visual.transformer.resblocks.{i}."
        out[b + "attn.in_proj_weight"] = sd[a + "attn.to_qkv.weight"]
        out[b + "attn.in_proj_bias"] = sd[a + "attn.to_qkv.bias"]
        for mine, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "attn.out_proj"),
                             ("mlp.0", "mlp.c_fc"), ("mlp.2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                out[f"{b}{theirs}.{p}"] = sd[f"{a}{mine}.{p}"]
    return out


def test_layouts_give_the_same_tokens(clip_dir, image, tmp_path):
    wan = load_clip_vision(clip_dir / tiny_clip.FILES["wan_pth"], dtype=torch.float32)
    hf = load_clip_vision(clip_dir / tiny_clip.FILES["comfy"], dtype=torch.float32)
    assert wan.config == hf.config == tiny_clip.TINY_CLIP_CONFIG
    out = wan(image)
    assert out.shape == (257, tiny_clip.TINY_CLIP_CONFIG.dim)
    assert torch.equal(out, hf(image))
    oc = tmp_path / "open_clip_pytorch_model.safetensors"
    sd = {k: v.half() for k, v in tiny_clip.state_dict().items()}
    save_file({k: v.contiguous() for k, v in _open_clip_names(sd).items()}, str(oc),
              metadata={"infinitetalk.num_heads": str(tiny_clip.TINY_CLIP_CONFIG.num_heads)})
    assert torch.equal(load_clip_vision(oc, dtype=torch.float32)(image), out)


def test_penultimate_block_output(clip_dir, image, tmp_path):
    """The last block, post_norm and head are in the file but must not affect the output."""
    sd = tiny_clip.state_dict()
    base = load_clip_vision(clip_dir / tiny_clip.FILES["comfy"], dtype=torch.float32)(image)
    last = tiny_clip.TINY_CLIP_CONFIG.num_layers - 1
    for name, changes_output in ((f"transformer.{last}.mlp.0.weight", False), ("post_norm.weight", False),
                                 ("head", False), (f"transformer.{last - 1}.mlp.0.weight", True)):
        changed = dict(sd)
        changed[name] = sd[name] * 3 + 1
        path = tmp_path / "changed.safetensors"
        save_file({k: v.half().contiguous() for k, v in tiny_clip.hf_state_dict(changed).items()}, str(path),
                  metadata={"infinitetalk.num_heads": str(tiny_clip.TINY_CLIP_CONFIG.num_heads)})
        out = load_clip_vision(path, dtype=torch.float32)(image)
        assert (rel_l2(out, base) > 1e-3) == changes_output, name


def test_batched_matches_single_and_any_image_size(clip_dir, image):
    model = load_clip_vision(clip_dir / tiny_clip.FILES["comfy"], dtype=torch.float32)
    other = torch.rand(3, 90, 150, generator=torch.Generator().manual_seed(4)) * 2 - 1
    batch = model(torch.stack([image, other]))
    assert batch.shape == (2, 257, tiny_clip.TINY_CLIP_CONFIG.dim)
    assert rel_l2(batch[1], model(other)) < 1e-6
    # the image is squashed to 224x224 whatever its size; an already-224 image is not resampled differently
    big = torch.nn.functional.interpolate(image[None], size=(224, 224), mode="bicubic", align_corners=False)[0]
    assert model(torch.rand(3, 400, 31) * 2 - 1).shape == (257, tiny_clip.TINY_CLIP_CONFIG.dim)
    assert rel_l2(model(big), model(image)) < 1e-6


def test_default_dtype_is_fp16_and_close(clip_dir, image):
    fp32 = load_clip_vision(clip_dir / tiny_clip.FILES["comfy"], dtype=torch.float32)(image)
    model = load_clip_vision(clip_dir / tiny_clip.FILES["comfy"])
    out = model(image)
    assert model.dtype == torch.float16 and out.dtype == torch.float16
    assert rel_l2(out.float(), fp32) < 5e-3


def test_head_count_needed_for_unknown_width(clip_dir, tmp_path, image):
    sd = tiny_clip.hf_state_dict(tiny_clip.state_dict())
    path = tmp_path / "no_heads.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError, match="no_heads.safetensors.*num_heads"):
        load_clip_vision(path)
    explicit = load_clip_vision(path, num_heads=tiny_clip.TINY_CLIP_CONFIG.num_heads, dtype=torch.float32)
    reference = load_clip_vision(clip_dir / tiny_clip.FILES["comfy"], dtype=torch.float32)
    assert rel_l2(explicit(image), reference(image)) < 1e-3


def test_wrong_component_refused(tmp_path):
    path = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file({"shared.weight": torch.zeros(8, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4),
               "encoder.final_layer_norm.weight": torch.ones(4)}, str(path))
    with pytest.raises(CheckpointError, match="umt5_xxl_fp16.safetensors.*not a CLIP vision encoder"):
        load_clip_vision(path)


def test_real_size_names_and_shapes_match_the_wan_checkpoint():
    """ViT-H/14 built on meta: the `visual.` names of the Wan CLIP file, 31 of its 32 blocks."""
    from infinitetalk.checkpoints.materialize import build_on_meta
    from infinitetalk.models.clip_vision import ClipVisionConfig, ClipVisionEncoder

    sd = build_on_meta(lambda: ClipVisionEncoder(ClipVisionConfig())).state_dict()
    assert sd["patch_embedding.weight"].shape == (1280, 3, 14, 14)
    assert sd["pos_embedding"].shape == (1, 257, 1280) and sd["cls_embedding"].shape == (1, 1, 1280)
    assert sd["transformer.30.attn.to_qkv.weight"].shape == (3840, 1280)
    assert sd["transformer.30.mlp.0.weight"].shape == (5120, 1280)
    assert "transformer.31.norm1.weight" not in sd and "post_norm.weight" not in sd and "head" not in sd


def test_fp8_files_are_dequantised_with_their_scales(clip_dir, image, tmp_path):
    from infinitetalk.tiny.layouts import save_fp8_comfy_quant, save_fp8_legacy

    reference = load_clip_vision(clip_dir / tiny_clip.FILES["comfy"], dtype=torch.float32)(image)
    hf = tiny_clip.hf_state_dict(tiny_clip.state_dict())
    linears = [k for k in hf if k.endswith("_proj.weight") or ".mlp.fc" in k and k.endswith(".weight")]
    meta = {"infinitetalk.num_heads": tiny_clip.TINY_CLIP_CONFIG.num_heads}
    legacy = save_fp8_legacy(hf, tmp_path / "legacy.safetensors", linear_names=linears, metadata=meta)
    per_row = save_fp8_comfy_quant(hf, tmp_path / "rows.safetensors", linear_names=linears, per_row=True, metadata=meta)
    for path in (legacy, per_row):
        out = load_clip_vision(path, dtype=torch.float32)(image)
        assert rel_l2(out, reference) < 0.1, path.name
