"""Every tiny DiT layout (base, InfiniteTalk patch, LoRAs) loads through `load_dit` and reproduces the
unprefixed fp32 file's output: exactly for fp32 layouts, within the storage precision otherwise, and
exactly (1e-5) against independently dequantised weights for the fp8 layouts.

Comparisons within a precision tolerance use one speaker: with two, L-RoPE assigns each token to a
speaker by an arg-max over an attention map, so a rounding-sized weight change can flip a token's
speaker and move the output by far more than the rounding. Exact comparisons use two speakers."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from infinitetalk.checkpoints import CheckpointError
from infinitetalk.loaders import load_dit
from infinitetalk.tiny import spec
from infinitetalk.tiny.dit import METADATA, write
from infinitetalk.tiny.layouts import save_safetensors

FP32 = "diffusion_models/tiny_wan2.1_i2v_480p_fp32.safetensors"
MEIGEN = "model_patches/tiny_MeiGen-InfiniteTalk/multi/infinitetalk.safetensors"
FP8_BASES = {  # file -> (key prefix, scale suffix, per-row scales)
    "tiny_Wan2_1-I2V-14B-480P_fp8_e4m3fn.safetensors": ("", None, False),
    "tiny_Wan2_1-I2V-14B-480p_fp8_e4m3fn_scaled_KJ.safetensors": ("", ".scale_weight", False),
    "tiny_wan2.1_i2v_480p_fp8_scaled.safetensors": ("model.diffusion_model.", ".weight_scale", False),
    "tiny_wan2.1_i2v_480p_fp8_rowwise.safetensors": ("", ".weight_scale", True),
}
# relative L2 bounds vs the fp32 file (fp32 compute): storage rounding only
BASE_TOL = {
    "tiny_Wan2.1-I2V-14B-480P": 1e-6,
    "tiny_wan2.1_i2v_480p_fp32.safetensors": 1e-6,
    "tiny_wan2.1_i2v_480p_bf16.safetensors": 1e-2,
    "tiny_wan2.1_i2v_480p_fp16.safetensors": 2e-3,
    **{name: 6e-2 for name in FP8_BASES},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls run faster on one thread, and do not fight other tests for the CI's two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_models")
    write(root, seed=0)
    return root


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    frames, h, w = 2, 4, 6
    masks = torch.zeros(3, h, w)
    masks[0, :, :3], masks[1, :, 3:] = 1, 1
    return dict(x=torch.randn(16, frames, h, w, generator=g), t=torch.tensor([700.0]),
                context=torch.randn(9, spec.T5_DIM, generator=g), clip_fea=torch.randn(1, 257, spec.CLIP_DIM, generator=g),
                y=torch.randn(20, frames, h, w, generator=g),
                audio=torch.randn(2, 4 * (frames - 1) + 1, 5, spec.AUDIO_LAYERS, spec.AUDIO_CHANNELS, generator=g),
                ref_target_masks=masks)


@pytest.fixture(scope="module")
def run(inputs):
    """(base, patch, loras, dtype, persons) -> (model, output), each combination loaded and run once."""
    models: dict = {}
    outputs: dict = {}

    def get(base, patch, loras=(), dtype=torch.float32, persons=2):
        key = (str(base), str(patch), tuple((str(p), s) for p, s in loras), dtype)
        if key not in models:
            models[key] = load_dit(base, patch, loras, dtype=dtype)
        if (key, persons) not in outputs:
            with torch.no_grad():
                outputs[key, persons] = models[key](**dict(inputs, audio=inputs["audio"][:persons]))
        return models[key], outputs[key, persons]

    return get


@pytest.fixture(scope="module")
def reference(tree, run):
    """Output of the fp32 files for two speakers."""
    return run(tree / FP32, tree / MEIGEN)[1]


@pytest.fixture(scope="module")
def reference1(tree, run):
    """Output of the fp32 files for one speaker."""
    return run(tree / FP32, tree / MEIGEN, persons=1)[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_tree_is_small(tree):
    size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    assert size < 20 * 2**20


def test_reference_depends_on_the_audio(tree, inputs, run, reference):
    assert reference.shape == inputs["x"].shape and torch.isfinite(reference).all()
    other = dict(inputs, audio=inputs["audio"].flip(0))
    model = run(tree / FP32, tree / MEIGEN)[0]
    assert _rel(model(**other), reference) > 1e-3


@pytest.mark.parametrize("name", sorted(BASE_TOL))
def test_base_layouts_match_fp32(tree, run, reference1, name):
    model, out = run(tree / "diffusion_models" / name, tree / MEIGEN, persons=1)
    assert _rel(out, reference1) <= BASE_TOL[name]
    q = model.blocks[0].self_attn.q
    if name in FP8_BASES:  # fp8 stays fp8 in memory; non-block layers keep their precision
        assert q.weight.dtype == torch.float8_e4m3fn
        assert (q.weight_scale is None) == (FP8_BASES[name][1] is None)
        assert model.text_embedding[0].weight.dtype == torch.float32
    else:
        assert q.weight.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(FP8_BASES))
def test_fp8_layouts_equal_their_dequantised_weights(tree, run, tmp_path, name):
    prefix, scale_suffix, per_row = FP8_BASES[name]
    deq = {}
    with safe_open(str(tree / "diffusion_models" / name), "pt") as f:
        keys = set(f.keys())
        for key in keys:
            if not key.startswith(prefix) or key.endswith((".scale_weight", ".weight_scale", ".scale_input",
                                                           ".input_scale", ".comfy_quant", "scaled_fp8")):
                continue
            t = f.get_tensor(key).float()
            layer = key[: -len(".weight")]
            if scale_suffix and layer + scale_suffix in keys:
                s = f.get_tensor(layer + scale_suffix).float()
                t = t * (s.reshape(-1, 1) if per_row else s.reshape(()))
            deq[key[len(prefix):]] = t
    path = save_safetensors(deq, tmp_path / "deq.safetensors", metadata=METADATA)
    want = run(path, tree / MEIGEN)[1]
    got = run(tree / "diffusion_models" / name, tree / MEIGEN)[1]
    assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("name,tol", [
    ("tiny_MeiGen-InfiniteTalk/multi/infinitetalk.safetensors", 0.0),
    ("tiny_wan2.1_infiniteTalk_multi_fp16.safetensors", 2e-3),
    ("tiny_Wan2_1-InfiniteTalk-Multi_fp8_e4m3fn_scaled_KJ.safetensors", 6e-2),
])
def test_patch_layouts_match_fp32(tree, run, reference, reference1, name, tol):
    model, out = run(tree / FP32, tree / "model_patches" / name, persons=1 if tol else 2)
    assert _rel(out, reference1 if tol else reference) <= tol
    if "fp8" in name:
        assert model.blocks[0].audio_cross_attn.q_linear.weight.dtype == torch.float8_e4m3fn


def test_bf16_compute(tree, run, reference1):
    model, out = run(tree / "diffusion_models/tiny_wan2.1_i2v_480p_bf16.safetensors",
                     tree / "model_patches/tiny_wan2.1_infiniteTalk_multi_fp16.safetensors", dtype=torch.bfloat16,
                     persons=1)
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert _rel(out, reference1) <= 5e-2


def test_lora_equals_manual_merge(tree, run, tmp_path):
    """lightx2v-style file (diffusion_model. prefix, down/up + alpha, diff, diff_b, diff_m) at strength 0.8."""
    lora_path = tree / "loras/tiny_lightx2v_I2V_14B_480p_cfg_step_distill_rank4_bf16.safetensors"
    with safe_open(str(tree / FP32), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}
    touched = set()
    with safe_open(str(lora_path), "pt") as f:
        keys = set(f.keys())
        for key in keys:
            name = key[len("diffusion_model."):]
            if name.endswith(".lora_down.weight"):
                m = name[: -len(".lora_down.weight")]
                down = f.get_tensor(key).float()
                up = f.get_tensor(f"diffusion_model.{m}.lora_up.weight").float()
                alpha = f.get_tensor(f"diffusion_model.{m}.alpha").item() / down.shape[0]
                merged[m + ".weight"] = merged[m + ".weight"] + 0.8 * alpha * (up @ down)
                touched.add(m + ".weight")
            elif name.endswith(".diff_b"):
                merged[name[:-7] + ".bias"] = merged[name[:-7] + ".bias"] + 0.8 * f.get_tensor(key).float()
                touched.add(name[:-7] + ".bias")
            elif name.endswith(".diff"):
                merged[name[:-5] + ".weight"] = merged[name[:-5] + ".weight"] + 0.8 * f.get_tensor(key).float()
                touched.add(name[:-5] + ".weight")
    assert any(k.endswith(".diff_m") for k in keys) and len(touched) > 20
    path = save_safetensors(merged, tmp_path / "merged.safetensors", metadata=METADATA)
    want, want_out = run(path, tree / MEIGEN)
    got, got_out = run(tree / FP32, tree / MEIGEN, [(lora_path, 0.8)])
    for k in touched:
        torch.testing.assert_close(got.state_dict()[k], want.state_dict()[k], rtol=1e-5, atol=1e-6)
    assert _rel(got_out, want_out) <= 1e-5


@pytest.mark.parametrize("lora", ["tiny_Wan2.1_I2V_14B_FusionX_LoRA.safetensors", "tiny_wan_i2v_peft_lora.safetensors"])
def test_lora_on_fp8_base(tree, run, reference1, lora):
    base = tree / "diffusion_models/tiny_wan2.1_i2v_480p_fp8_scaled.safetensors"
    model, out = run(base, tree / MEIGEN, [(tree / "loras" / lora, 1.0)], persons=1)
    q = model.blocks[0].self_attn.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale is not None  # stays fp8: unmerged low-rank
    assert q.lora_down is not None and q.lora_up.dtype == torch.float32
    if "peft" in lora:  # self-attention only: the FFN keeps fp8 + scale
        assert model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
        assert model.blocks[0].ffn[0].weight_scale is not None
    fp32_out = run(tree / FP32, tree / MEIGEN, [(tree / "loras" / lora, 1.0)], persons=1)[1]
    assert _rel(out, fp32_out) <= 6e-2 and _rel(out, reference1) > 1e-3


def test_wrong_component_files_name_the_file(tree):
    patch = tree / MEIGEN
    lora = tree / "loras/tiny_wan_i2v_peft_lora.safetensors"
    with pytest.raises(CheckpointError, match="infinitetalk.safetensors"):
        load_dit(patch, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="tiny_wan_i2v_peft_lora"):
        load_dit(lora, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="tiny_wan2.1_i2v_480p_fp16"):
        load_dit(tree / FP32, tree / "diffusion_models/tiny_wan2.1_i2v_480p_fp16.safetensors", dtype=torch.float32)
    with pytest.raises(CheckpointError, match="tiny_wan2.1_i2v_480p_fp32"):
        load_dit(tree / FP32, dtype=torch.float32)  # base without the patch
    with pytest.raises(CheckpointError, match="tiny_wan2.1_i2v_480p_bf16"):
        load_dit(tree / FP32, patch, loras=[(tree / "diffusion_models/tiny_wan2.1_i2v_480p_bf16.safetensors", 1.0)],
                 dtype=torch.float32)
