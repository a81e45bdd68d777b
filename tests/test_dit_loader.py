"""load_dit: file layouts, config inference, metadata, clear errors, fp8 storage."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from _dit_testutil import random_inputs, random_state, run, small_config
from infinitetalk.checkpoints import CheckpointError
from infinitetalk.errors import InputError
from infinitetalk.loaders.dit import infer_dit_config, load_dit

AUDIO = re.compile(r"^(audio_proj\.|blocks\.\d+\.(audio_cross_attn|norm_x)\.)")
CFG = small_config()  # dim 64, 4 heads (head_dim 16), audio 2 layers × 8 channels
META = {"format": "pt", "infinitetalk.num_heads": str(CFG.num_heads), "infinitetalk.audio_layers": "2"}


@pytest.fixture(scope="module")
def state():
    return random_state(CFG, seed=3)


def _save(path, tensors, prefix="", metadata=META):
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _split(state):
    patch = {k: v for k, v in state.items() if AUDIO.match(k)}
    base = {k: v for k, v in state.items() if not AUDIO.match(k)}
    return base, patch


def test_infinitetalk_patch_key_count_matches_the_real_layout(state):
    _, patch = _split(state)
    assert len(patch) == 8 * CFG.num_layers + 10  # 330 for 40 layers


def test_single_file_config_and_output(tmp_path, state):
    model = load_dit(_save(tmp_path / "full.safetensors", state), dtype=torch.float32)
    assert model.config == CFG
    inputs = random_inputs(CFG, persons=2)
    reference = run(load_dit(tmp_path / "full.safetensors", dtype=torch.float32), inputs)
    assert torch.equal(run(model, inputs), reference)


def test_base_plus_patch_with_prefixes_shards_and_folder(tmp_path, state):
    base, patch = _split(state)
    keys = sorted(base)
    half = len(keys) // 2
    shard_dir = tmp_path / "base"
    shard_dir.mkdir()
    shards = [_save(shard_dir / f"s{i}.safetensors", {k: base[k] for k in part}, prefix="model.diffusion_model.")
              for i, part in enumerate((keys[:half], keys[half:]))]
    index = {"metadata": {}, "weight_map": {"model.diffusion_model." + k: f"s{int(i >= half)}.safetensors"
                                            for i, k in enumerate(keys)}}
    (shard_dir / "dit.safetensors.index.json").write_text(json.dumps(index))
    patch_file = _save(tmp_path / "infinitetalk_multi.safetensors", patch, prefix="diffusion_model.")
    odd_prefix = _save(tmp_path / "kijai.safetensors", patch, prefix="audio_adapter.")
    full = load_dit(_save(tmp_path / "full.safetensors", state), dtype=torch.float32)
    inputs = random_inputs(CFG, persons=2)
    want = run(full, inputs)
    index_file = shard_dir / "dit.safetensors.index.json"
    for source, p in ((shards, patch_file), (shard_dir, patch_file), (index_file, odd_prefix)):
        model = load_dit(source, p, dtype=torch.float32)
        assert model.config == CFG
        torch.testing.assert_close(run(model, inputs), want, rtol=1e-5, atol=1e-5)  # alignment-dependent GEMMs


def test_missing_patch_is_a_clear_error(tmp_path, state):
    base, patch = _split(state)
    base_file = _save(tmp_path / "wan_i2v.safetensors", base)
    with pytest.raises(CheckpointError, match="InfiniteTalk patch file is needed"):
        load_dit(base_file)
    with pytest.raises(CheckpointError, match="not a Wan2.1 I2V DiT"):
        load_dit(_save(tmp_path / "patch_only.safetensors", patch))
    with pytest.raises(CheckpointError, match="no InfiniteTalk audio tensors"):
        load_dit(base_file, patch=base_file)


def test_num_heads_from_metadata_default_and_override(tmp_path, state):
    no_meta = {"format": "pt"}
    path = _save(tmp_path / "nometa.safetensors", state, metadata={**no_meta, "infinitetalk.audio_layers": "2"})
    with pytest.raises(CheckpointError, match="num_heads"):
        load_dit(path)  # dim 64 is not a multiple of the real head width 128
    assert load_dit(path, num_heads=2).config.num_heads == 2
    assert load_dit(_save(tmp_path / "meta.safetensors", state)).config.num_heads == CFG.num_heads
    with pytest.raises(CheckpointError, match="dim=128"):
        load_dit(path, num_heads=2, config={"dim": 128})
    with pytest.raises(InputError, match="bogus"):
        load_dit(path, num_heads=2, config={"bogus": 1})


def test_real_head_width_and_audio_layout_inferred_without_metadata():
    cfg = small_config(dim=256, num_heads=2, audio_layers=12, audio_channels=4)
    shapes = {k: v.shape for k, v in random_state(cfg).items()}

    class Shapes(dict):
        def shape(self, key):
            return self[key]

    inferred = infer_dit_config(Shapes(shapes))
    assert inferred == cfg


def test_bf16_storage_and_fp8_scaled_patch(tmp_path, state):
    base, patch = _split(state)
    fp8 = {}
    for k, v in patch.items():
        if k.endswith(".weight") and v.dim() == 2:
            scale = v.abs().max() / 448
            fp8[k] = (v / scale).to(torch.float8_e4m3fn)
            fp8[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            fp8[k] = v
    fp8["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    model = load_dit(_save(tmp_path / "base.safetensors", base), _save(tmp_path / "fp8.safetensors", fp8))
    q = model.blocks[0].audio_cross_attn.q_linear
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale is not None
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    inputs = random_inputs(CFG, persons=2)
    full = load_dit(_save(tmp_path / "full.safetensors", state), dtype=torch.float32)
    a, b = run(model, inputs), run(full, inputs)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_bad_dtype_and_backend(tmp_path, state):
    path = _save(tmp_path / "full.safetensors", state)
    with pytest.raises(InputError, match="dtype"):
        load_dit(path, dtype=torch.int8)
    with pytest.raises(InputError, match="attention"):
        load_dit(path, attention="sage")



def test_parity_kind_honours_case_config(tmp_path, state):
    """The golden-case config reaches the loader: head count used, contradictions and unsupported flags fail."""
    from infinitetalk.parity.kinds.dit import _config_overrides

    path = _save(tmp_path / "nometa.safetensors", state, metadata={"format": "pt", "infinitetalk.audio_layers": "2"})
    case_config = {"model_type": "i2v", "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True,
                   "weight_init": False, "dim": 64, "num_heads": 8, "patch_size": [1, 2, 2], "eps": 1e-6}
    config = _config_overrides(case_config)
    model = load_dit(path, num_heads=config.pop("num_heads"), config=config)
    assert model.config.num_heads == 8 and model.blocks[0].self_attn.head_dim == 8
    with pytest.raises(ValueError, match="qk_norm"):
        _config_overrides({**case_config, "qk_norm": False})
    with pytest.raises(CheckpointError, match="ffn_dim"):
        load_dit(path, num_heads=8, config={"ffn_dim": 4})
