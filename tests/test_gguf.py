"""GGUF: torch dequantisers vs the `gguf` package's, tiny GGUF DiTs in each quant mix load packed and give
the DiT output of their dequantised weights, detection by content, LoRAs keep GGUF weights packed."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from infinitetalk.checkpoints import CheckpointError, build_on_meta, load_module, open_checkpoint
from infinitetalk.checkpoints.detect import detect_component
from infinitetalk.ops.quants import QUANT_BLOCKS, dequantize_blocks, packed_nbytes
from infinitetalk.loaders.dit import load_dit
from infinitetalk.models.dit import InfiniteTalkDiT
from infinitetalk.tiny.gguf import GGUF_MIXES, save_gguf
from infinitetalk.tiny.layouts import random_lora, save_lora

from _dit_testutil import random_inputs, random_state, run, small_config

CFG = small_config(num_layers=1)
HEADS = dict(num_heads=CFG.num_heads, config={"audio_layers": CFG.audio_layers})
_F16_AT = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
           "Q6_K": [208]}


@pytest.mark.parametrize("kind", sorted(_F16_AT))
def test_dequantizer_matches_the_gguf_package_on_any_bytes(kind):
    """Random block bytes (with finite half-precision scales) decode exactly like gguf-py's numpy decoder."""
    qtype = gguf.GGMLQuantizationType[kind]
    _, size = QUANT_BLOCKS[int(qtype)]
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, (12, size), dtype=np.uint8)
    for at in _F16_AT[kind]:
        blocks[:, at:at + 2] = rng.uniform(-2, 2, (12, 1)).astype(np.float16).view(np.uint8)
    want = gguf.quants.dequantize(blocks, qtype)
    got = dequantize_blocks(torch.from_numpy(blocks), int(qtype), want.shape)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.fixture(scope="module")
def state():
    return random_state(CFG, seed=4)


@pytest.mark.parametrize("mix", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"])
def test_gguf_dit_loads_packed_and_matches_its_dequantised_weights(tmp_path, state, mix):
    path = save_gguf(state, tmp_path / f"tiny_{mix}.gguf", mix)
    assert detect_component(path) == "dit+infinitetalk"
    model = load_dit(path, dtype=torch.float32, **HEADS)
    q, v = model.blocks[0].self_attn.q, model.blocks[0].self_attn.v
    default, favoured = GGUF_MIXES[mix]
    assert q.weight.dtype == torch.uint8 and q.gguf_type == gguf.GGMLQuantizationType[default]
    assert v.gguf_type == gguf.GGMLQuantizationType[favoured]
    assert model.patch_embedding.weight.shape == state["patch_embedding.weight"].shape  # 5-D via orig_shape
    # reference: every tensor dequantised by the gguf package, loaded as plain float32 weights
    reader = gguf.GGUFReader(path)
    ref_state = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(
        state[t.name].shape).float() for t in reader.tensors}
    ref = load_module(build_on_meta(lambda: InfiniteTalkDiT(CFG, compute_dtype=torch.float32)), ref_state,
                      dtype=torch.float32)
    err = (ref_state["blocks.0.ffn.0.weight"] - state["blocks.0.ffn.0.weight"]).abs().max()
    assert 0 < err < (0.05 if mix == "Q8_0" else 0.5)  # really quantised
    inputs = random_inputs(CFG, persons=2)
    want = run(ref, inputs)
    torch.testing.assert_close(run(model, inputs), want, rtol=1e-5, atol=1e-5)
    ckpt = open_checkpoint(path)
    assert q.weight.numel() == packed_nbytes(ckpt.shape("blocks.0.self_attn.q.weight"), q.gguf_type)
    packed = sum(p.numel() * p.element_size() for p in model.parameters())
    plain = sum(p.numel() * p.element_size() for p in ref.parameters())
    assert packed < 0.5 * plain


def test_lora_on_gguf_keeps_blocks_and_matches_merge(tmp_path, state):
    path = save_gguf(state, tmp_path / "tiny_Q8_0.gguf", "Q8_0")
    names = ["blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight"]
    lora = save_lora(random_lora(state, rank=4, seed=9, linear_names=names, alpha=4.0, std=0.3),
                     tmp_path / "l.safetensors", prefix="diffusion_model.")
    model = load_dit(path, loras=[(lora, 0.8)], dtype=torch.float32, **HEADS)
    q = model.blocks[0].self_attn.q
    assert q.weight.dtype == torch.uint8 and q.lora_down.shape == (4, CFG.dim)
    ckpt = open_checkpoint(path)
    deq = {k: ckpt[k] for k in ckpt}
    merged = load_dit(_save(deq, tmp_path / "deq.safetensors"), loras=[(lora, 0.8)], dtype=torch.float32, **HEADS)
    assert merged.blocks[0].self_attn.q.lora_down is None
    inputs = random_inputs(CFG, persons=1)
    torch.testing.assert_close(run(model, inputs), run(merged, inputs), rtol=1e-4, atol=1e-4)


def _save(tensors, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_unsupported_type_and_corrupt_file_name_the_file(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "q2.gguf", arch="wan")
    w.add_tensor("blocks.0.self_attn.q.weight", np.zeros((2, 84), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match=r"q2\.gguf.*blocks\.0\.self_attn\.q\.weight.*Q2_K.*not supported"):
        open_checkpoint(tmp_path / "q2.gguf")
    good = save_gguf({"x.weight": torch.randn(4, 32)}, tmp_path / "t.gguf")
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*GGUF"):
        open_checkpoint(tmp_path / "cut.gguf")


def test_find_models_sorts_gguf_by_content(tmp_path, state):
    from infinitetalk.checkpoints.detect import find_models

    save_gguf(state, tmp_path / "unet" / "wan-i2v-Q4_K_M.gguf", "Q4_K_M")
    base_only = {k: v for k, v in state.items() if not k.startswith(("audio_proj.", "blocks.0.audio_cross_attn."))}
    save_gguf(base_only, tmp_path / "unet" / "no-audio-Q8_0.gguf", "Q8_0")
    found = find_models(tmp_path)
    assert [p.name for p in found.dit_infinitetalk] == ["wan-i2v-Q4_K_M.gguf"]
    assert [p.name for p in found.dit] == ["no-audio-Q8_0.gguf"]
    assert set(found.precision.values()) == {"gguf"} and not found.errors


def test_base_and_patch_as_separate_gguf_files(tmp_path, state):
    from infinitetalk.loaders.dit import is_audio_key

    full = load_dit(save_gguf(state, tmp_path / "full.gguf", "Q5_K_M"), dtype=torch.float32, **HEADS)
    base = save_gguf({k: v for k, v in state.items() if not is_audio_key(k)}, tmp_path / "base.gguf", "Q5_K_M")
    patch = save_gguf({k: v for k, v in state.items() if is_audio_key(k)}, tmp_path / "patch.gguf", "Q5_K_M")
    assert detect_component(patch) == "infinitetalk" and detect_component(base) == "dit"
    split = load_dit(base, patch, dtype=torch.float32, **HEADS)
    kv = split.blocks[0].audio_cross_attn.kv_linear
    assert kv.weight.dtype == torch.uint8 and kv.gguf_type == gguf.GGMLQuantizationType.Q6_K
    inputs = random_inputs(CFG, persons=2)
    torch.testing.assert_close(run(split, inputs), run(full, inputs), rtol=0, atol=0)


def test_plain_types_read_as_stored(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w = gguf.GGUFWriter(tmp_path / "plain.gguf", arch="wan")
    w.add_tensor("a.weight", gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16),
                 raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.add_tensor("b.weight", x.astype(np.float16))
    w.add_tensor("c.bias", x[0])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ckpt = open_checkpoint(tmp_path / "plain.gguf")
    assert [(ckpt.dtype(k), ckpt[k].dtype, tuple(ckpt[k].shape)) for k in ("a.weight", "b.weight", "c.bias")] == [
        (torch.bfloat16, torch.bfloat16, (4, 64)), (torch.float16, torch.float16, (4, 64)),
        (torch.float32, torch.float32, (64,))]
    torch.testing.assert_close(ckpt["a.weight"].float(), torch.from_numpy(x), rtol=1e-2, atol=1e-2)
    assert ckpt.packed_type("a.weight") is None and ckpt.metadata["general.architecture"] == "wan"
