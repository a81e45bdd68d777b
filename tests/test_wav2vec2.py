"""wav2vec2 audio encoder: math against an independent straightforward implementation (and against
transformers when it happens to be installed), every file layout, config inference, error reporting."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from infinitetalk.errors import CheckpointError, InputError
from infinitetalk.loaders.wav2vec2 import load_wav2vec2
from infinitetalk.models.wav2vec2 import Wav2Vec2Config, encode_audio, frames_for, normalize_waveform
from infinitetalk.parity.runner import rel_l2
from infinitetalk.tiny import wav2vec2 as tiny
from infinitetalk.tiny.layouts import save_pth

POS = "encoder.pos_conv_embed.conv."


# ---------------------------------------------------------------- independent reference (test-only)

def _ln(x, sd, name, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps)


def reference_features(sd: dict, cfg: Wav2Vec2Config, wave: torch.Tensor, video_length: int,
                       gelu=F.gelu) -> torch.Tensor:
    """Whole-utterance, unchunked, explicit-softmax version of the InfiniteTalk wav2vec2 forward."""
    x = wave[None, None]
    for i, stride in enumerate(cfg.conv_stride):
        p = f"feature_extractor.conv_layers.{i}."
        x = F.conv1d(x, sd[p + "conv.weight"], sd.get(p + "conv.bias"), stride=stride)
        if cfg.feat_extract_norm == "group" and i == 0:
            x = F.group_norm(x, x.shape[1], sd[p + "layer_norm.weight"], sd[p + "layer_norm.bias"], 1e-5)
        elif cfg.feat_extract_norm == "layer":
            x = _ln(x.transpose(1, 2), sd, p + "layer_norm", 1e-5).transpose(1, 2)
        x = gelu(x)
    x = F.interpolate(x, size=video_length, mode="linear", align_corners=True)[0].T
    eps = cfg.layer_norm_eps
    x = F.linear(_ln(x, sd, "feature_projection.layer_norm", eps),
                 sd["feature_projection.projection.weight"], sd["feature_projection.projection.bias"])
    kernel = torch._weight_norm(sd[POS + "weight_v"], sd[POS + "weight_g"], 2)
    k = kernel.shape[-1]
    pos = F.conv1d(x.T[None], kernel, sd[POS + "bias"], padding=k // 2, groups=cfg.num_conv_pos_embedding_groups)[0]
    if k % 2 == 0:
        pos = pos[:, :-1]
    x = x + gelu(pos.T)
    if not cfg.do_stable_layer_norm:
        x = _ln(x, sd, "encoder.layer_norm", eps)
    heads, t = cfg.num_attention_heads, x.shape[0]

    def lin(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    outs = []
    for n in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{n}."

        def attn(h):
            q, kk, v = (lin(h, p + f"attention.{s}_proj").view(t, heads, -1).transpose(0, 1) for s in "qkv")
            w = torch.softmax(q @ kk.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
            return lin((w @ v).transpose(0, 1).reshape(t, -1), p + "attention.out_proj")

        def ffn(h):
            return lin(gelu(lin(h, p + "feed_forward.intermediate_dense")), p + "feed_forward.output_dense")

        if cfg.do_stable_layer_norm:
            x = x + attn(_ln(x, sd, p + "layer_norm", eps))
            x = x + ffn(_ln(x, sd, p + "final_layer_norm", eps))
        else:
            x = _ln(x + attn(x), sd, p + "layer_norm", eps)
            x = _ln(x + ffn(x), sd, p + "final_layer_norm", eps)
        outs.append(x)
    if cfg.do_stable_layer_norm:
        outs[-1] = _ln(outs[-1], sd, "encoder.layer_norm", eps)
    return torch.stack(outs, dim=1)


VARIANTS = {
    "base_unequal_conv_even_pos": Wav2Vec2Config(
        hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=40,
        conv_dim=(16, 12, 20, 12, 8, 12, 16), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
    "odd_pos_kernel_short_cnn": Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, conv_dim=(8, 8, 12),
        conv_kernel=(10, 5, 3), conv_stride=(5, 4, 2), num_conv_pos_embeddings=9, num_conv_pos_embedding_groups=2),
    "layer_norm_stable": Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32, conv_dim=(8,) * 7,
        conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4),
}


def _write(tmp_path, cfg, seed=0, name="w.safetensors"):
    sd = tiny.state_dict(seed, cfg)
    path = tmp_path / name
    save_file(sd, str(path))
    return sd, path


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_independent_reference(tmp_path, variant):
    cfg = VARIANTS[variant]
    sd, path = _write(tmp_path, cfg)
    model = load_wav2vec2(path, cfg)
    wave = normalize_waveform(torch.randn(12_345, generator=torch.Generator().manual_seed(1)))
    n50 = cfg.num_cnn_frames(wave.shape[0])
    model.feature_extractor.chunk_frames = n50 // 3 - 1  # 4 front-end chunks, the last ragged: must be exact
    for video_length in (frames_for(wave.shape[0]), n50, 1):
        with torch.inference_mode():
            got = model(wave, video_length)
        want = reference_features(sd, cfg, wave, video_length)
        assert got.shape == (video_length, cfg.num_hidden_layers, cfg.hidden_size)
        assert rel_l2(got, want) < 2e-6, (variant, video_length)


def test_reference_is_sensitive_to_gelu_variant_and_layer_order(tmp_path):
    """The comparison above can fail: a tanh-GELU or a pre-LN model is far outside its bound."""
    cfg = VARIANTS["base_unequal_conv_even_pos"]
    sd, path = _write(tmp_path, cfg)
    wave = normalize_waveform(torch.randn(16_000, generator=torch.Generator().manual_seed(2)))
    with torch.inference_mode():
        got = load_wav2vec2(path, cfg)(wave, 25)
        pre_ln = load_wav2vec2(path, Wav2Vec2Config(**{**cfg.__dict__, "do_stable_layer_norm": True}))(wave, 25)
    assert rel_l2(got, reference_features(sd, cfg, wave, 25)) < 2e-6
    assert rel_l2(got, reference_features(sd, cfg, wave, 25, gelu=lambda t: F.gelu(t, approximate="tanh"))) > 2e-5
    assert rel_l2(pre_ln, reference_features(sd, cfg, wave, 25)) > 1e-2


def test_matches_transformers_when_installed(tmp_path):
    transformers = pytest.importorskip("transformers")
    for cfg in VARIANTS.values():
        hf_cfg = transformers.Wav2Vec2Config(**tiny.hf_config_dict(cfg))
        hf = transformers.Wav2Vec2Model(hf_cfg).eval()
        sd = tiny.state_dict(3, cfg)
        state = dict(hf.state_dict())
        for name in state:
            src = name.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v")
            state[name] = sd[src]
        hf.load_state_dict(state)
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "hf.safetensors"))
        ours = load_wav2vec2(tmp_path / "hf.safetensors", hf_cfg.to_dict())
        wave = torch.randn(20_000, generator=torch.Generator().manual_seed(4))
        with torch.inference_mode():
            ref = torch.stack(hf(wave[None], output_hidden_states=True).hidden_states[1:], dim=1)[0].transpose(0, 1)
            got = ours(wave, ref.shape[0])  # at 50 Hz the interpolation is the identity: plain HF semantics
        assert rel_l2(got, ref) < 5e-6


def test_waveform_normalisation_and_frame_count():
    x = torch.randn(18_560, generator=torch.Generator().manual_seed(5)) * 0.3 + 0.2
    y = normalize_waveform(x)
    x64 = x.double().numpy()
    want = (x64 - x64.mean()) / np.sqrt(x64.var() + 1e-7)  # population variance
    assert y.dtype == torch.float32 and np.abs(y.double().numpy() - want).max() < 1e-6
    assert frames_for(18_560) == 28  # 18560/16000*25 = 28.999999999999996 in float64
    assert frames_for(16_000) == 25 and frames_for(15_999) == 24 and frames_for(48_000, fps=30) == 90
    with pytest.raises(InputError, match="audio"):
        normalize_waveform(torch.zeros(2, 100))


def test_config_from_hf_dict_and_topology():
    cfg = Wav2Vec2Config.from_hf_dict({**tiny.hf_config_dict(), "vocab_size": 99, "tdnn_dim": [1, 2]})
    assert cfg == tiny.TINY_WAV2VEC2_CONFIG
    assert (cfg.total_stride, cfg.receptive_field) == (320, 400)  # 16 kHz -> 50 Hz
    assert cfg.num_cnn_frames(16_000) == 49 and cfg.num_cnn_frames(399) == 0
    with pytest.raises(ValueError, match="hidden_act"):
        Wav2Vec2Config.from_hf_dict({**tiny.hf_config_dict(), "hidden_act": "relu"})
    with pytest.raises(ValueError, match="feat_extract_norm"):
        Wav2Vec2Config(feat_extract_norm="batch")


def test_every_tiny_layout_loads_like_the_canonical_file(tmp_path):
    files = tiny.write(tmp_path / "models", seed=0)
    assert [f.relative_to(tmp_path / "models").as_posix() for f in files] == list(tiny.FILES.values())
    canonical = tmp_path / "canonical.safetensors"
    save_file(tiny.state_dict(0), str(canonical))
    meta_only = tmp_path / "meta_only"  # no config.json: config inferred from shapes + metadata
    meta_only.mkdir()
    save_file(tiny.state_dict(0), str(meta_only / "w.safetensors"),
              metadata={"infinitetalk.num_attention_heads": str(tiny.TINY_WAV2VEC2_CONFIG.num_attention_heads)})
    bin_folder = tmp_path / "hf_bin"
    save_pth({"wav2vec2." + k: v for k, v in tiny.state_dict(0).items()}, bin_folder / "pytorch_model.bin")
    (bin_folder / "config.json").write_text(json.dumps(tiny.hf_config_dict()))

    wave = torch.randn(40_000, generator=torch.Generator().manual_seed(6))
    ref_model = load_wav2vec2(canonical, tiny.TINY_WAV2VEC2_CONFIG)
    ref = encode_audio(ref_model, wave)
    assert ref.shape == (62, tiny.TINY_WAV2VEC2_CONFIG.num_hidden_layers, tiny.TINY_WAV2VEC2_CONFIG.hidden_size)
    for path in [*files, files[1].parent, meta_only / "w.safetensors", bin_folder]:
        model = load_wav2vec2(path)
        assert model.config == tiny.TINY_WAV2VEC2_CONFIG, path
        assert model.feature_projection.projection.weight.dtype == torch.float32
        out = encode_audio(model, wave)
        if "fp16" in str(path):
            assert 0 < rel_l2(out, ref) < 5e-3
        else:
            assert torch.equal(out, ref), path


def test_folded_weight_norm_and_preprocessor_config(tmp_path):
    cfg = tiny.TINY_WAV2VEC2_CONFIG
    sd = tiny.state_dict(1, cfg)
    folded = {k: v for k, v in sd.items() if not k.startswith(POS + "weight_")}
    folded[POS + "weight"] = torch._weight_norm(sd[POS + "weight_v"], sd[POS + "weight_g"], 2)
    save_file(sd, str(tmp_path / "a.safetensors"))
    (tmp_path / "b").mkdir()
    save_file(folded, str(tmp_path / "b" / "model.safetensors"))
    (tmp_path / "b" / "config.json").write_text(json.dumps(tiny.hf_config_dict(cfg)))
    (tmp_path / "b" / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    a, b = load_wav2vec2(tmp_path / "a.safetensors", cfg), load_wav2vec2(tmp_path / "b")
    assert not a.normalize_input and b.normalize_input  # default (no config): off, like chinese-wav2vec2-base
    wave = torch.randn(20_000, generator=torch.Generator().manual_seed(7)) * 0.05
    with torch.inference_mode():
        assert rel_l2(b(wave, 31), a(wave, 31)) < 1e-6
    assert rel_l2(encode_audio(a, wave, normalize=True), encode_audio(b, wave)) < 1e-6
    assert rel_l2(encode_audio(a, wave), encode_audio(b, wave, normalize=False)) < 1e-6
    assert rel_l2(encode_audio(a, wave), encode_audio(b, wave)) > 1e-3  # the setting matters
    assert rel_l2(encode_audio(a, wave), encode_audio(b, wave)) > 1e-3  # the flag really changes the input


def test_bad_files_and_inputs_are_reported(tmp_path):
    wrong = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}, str(wrong))
    with pytest.raises(CheckpointError, match="umt5_xxl_fp16.safetensors.*not a single wav2vec2"):
        load_wav2vec2(wrong)
    cfg = tiny.TINY_WAV2VEC2_CONFIG
    good = tmp_path / "w2v.safetensors"
    save_file(tiny.state_dict(0, cfg), str(good))
    with pytest.raises(CheckpointError, match="w2v.safetensors.*shape"):
        load_wav2vec2(good, Wav2Vec2Config(**{**cfg.__dict__, "intermediate_size": 48}))
    (tmp_path / "config.json").write_text(json.dumps({**tiny.hf_config_dict(cfg), "hidden_act": "swish"}))
    with pytest.raises(CheckpointError, match="w2v.safetensors.*hidden_act"):
        load_wav2vec2(good)
    model = load_wav2vec2(good, cfg)
    with pytest.raises(InputError, match="audio"):
        encode_audio(model, torch.zeros(2, 16_000))
    with pytest.raises(InputError, match="audio"):
        encode_audio(model, torch.randn(500))  # shorter than one video frame
