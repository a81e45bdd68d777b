"""Tiny random wav2vec2 audio encoder (real 7-layer CNN topology, so 16 kHz -> 50 Hz holds) in the
layouts users have:

- `audio_encoders/wav2vec2-chinese-base_fp16.safetensors`  Comfy-Org / Kijai single file: fp16, no
  prefix, weight norm as `weight_g`/`weight_v`, `masked_spec_embed` kept; sizes the shapes cannot tell
  (heads, strides) in `infinitetalk.*` metadata,
- `wav2vec2/chinese-wav2vec2-base/`  Hugging Face folder: `model.safetensors` (fp32,
  `Wav2Vec2ForPreTraining` keys: `wav2vec2.` prefix plus quantizer / project_q / project_hid) and
  `config.json`,
- `wav2vec2/chinese-wav2vec2-base-parametrizations/model.safetensors`  recent-transformers naming
  (`parametrizations.weight.original0/1`), no prefix, fp32, with `config.json`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoints.materialize import build_on_meta
from ..models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Encoder
from .layouts import random_state_dict, save_safetensors
from .spec import AUDIO_CHANNELS, AUDIO_CONV_DIM, AUDIO_FFN, AUDIO_HEADS, AUDIO_LAYERS

__all__ = ["write", "TINY_WAV2VEC2_CONFIG", "FILES", "state_dict", "hf_config_dict"]

TINY_WAV2VEC2_CONFIG = Wav2Vec2Config(
    hidden_size=AUDIO_CHANNELS, num_hidden_layers=AUDIO_LAYERS, num_attention_heads=AUDIO_HEADS,
    intermediate_size=AUDIO_FFN, conv_dim=(AUDIO_CONV_DIM,) * 7,
)
FILES = {
    "comfy_fp16": "audio_encoders/wav2vec2-chinese-base_fp16.safetensors",
    "hf_folder": "wav2vec2/chinese-wav2vec2-base/model.safetensors",
    "parametrizations": "wav2vec2/chinese-wav2vec2-base-parametrizations/model.safetensors",
}
_POS = "encoder.pos_conv_embed.conv."
_CODEVECTOR_GROUPS, _CODEVECTORS, _CODEVECTOR_DIM, _PROJ_DIM = 2, 8, 16, 16


def state_dict(seed: int = 0, cfg: Wav2Vec2Config = TINY_WAV2VEC2_CONFIG) -> dict[str, torch.Tensor]:
    """Canonical float32 `Wav2Vec2Model` state dict (HF names, `weight_g`/`weight_v`, + masked_spec_embed)."""
    state = random_state_dict(build_on_meta(lambda: Wav2Vec2Encoder(cfg)), seed)
    g = torch.Generator().manual_seed(seed + 7)
    state["masked_spec_embed"] = torch.rand(cfg.hidden_size, generator=g)
    return state


def _pretraining_extras(cfg: Wav2Vec2Config, seed: int) -> dict[str, torch.Tensor]:
    """Heads of `Wav2Vec2ForPreTraining` that a loader must ignore."""
    g = torch.Generator().manual_seed(seed + 11)
    n = _CODEVECTOR_GROUPS * _CODEVECTORS
    shapes = {
        "quantizer.codevectors": (1, n, _CODEVECTOR_DIM // _CODEVECTOR_GROUPS),
        "quantizer.weight_proj.weight": (n, cfg.conv_dim[-1]), "quantizer.weight_proj.bias": (n,),
        "project_q.weight": (_PROJ_DIM, _CODEVECTOR_DIM), "project_q.bias": (_PROJ_DIM,),
        "project_hid.weight": (_PROJ_DIM, cfg.hidden_size), "project_hid.bias": (_PROJ_DIM,),
    }
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def hf_config_dict(cfg: Wav2Vec2Config = TINY_WAV2VEC2_CONFIG) -> dict:
    """A `config.json` as transformers writes it (the fields that matter plus typical irrelevant ones)."""
    return {
        "architectures": ["Wav2Vec2ForPreTraining"], "model_type": "wav2vec2",
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
        "conv_dim": list(cfg.conv_dim), "conv_kernel": list(cfg.conv_kernel), "conv_stride": list(cfg.conv_stride),
        "conv_bias": cfg.conv_bias, "feat_extract_norm": cfg.feat_extract_norm, "feat_extract_activation": "gelu",
        "hidden_act": "gelu", "num_conv_pos_embeddings": cfg.num_conv_pos_embeddings,
        "num_conv_pos_embedding_groups": cfg.num_conv_pos_embedding_groups, "layer_norm_eps": cfg.layer_norm_eps,
        "do_stable_layer_norm": cfg.do_stable_layer_norm, "num_feat_extract_layers": len(cfg.conv_dim),
        "hidden_dropout": 0.1, "attention_dropout": 0.1, "mask_time_prob": 0.05, "vocab_size": 32,
        "num_codevector_groups": _CODEVECTOR_GROUPS, "num_codevectors_per_group": _CODEVECTORS,
        "codevector_dim": _CODEVECTOR_DIM, "proj_codevector_dim": _PROJ_DIM,
    }


def write(models_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write every layout under `models_dir`; returns the checkpoint files (not the JSON configs)."""
    root = Path(models_dir)
    cfg = TINY_WAV2VEC2_CONFIG
    state = state_dict(seed, cfg)
    meta = {"infinitetalk.num_attention_heads": cfg.num_attention_heads,
            "infinitetalk.conv_stride": list(cfg.conv_stride)}
    written = [save_safetensors(state, root / FILES["comfy_fp16"], dtype=torch.float16, metadata=meta)]

    hf = root / FILES["hf_folder"]
    # the pre-training heads sit beside (not under) the `wav2vec2.` prefix, as in real checkpoints
    full = {"wav2vec2." + k: v for k, v in state.items()} | _pretraining_extras(cfg, seed)
    written.append(save_safetensors(full, hf, dtype=torch.float32))
    (hf.parent / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))

    renamed = {k.replace(_POS + "weight_g", _POS + "parametrizations.weight.original0")
                .replace(_POS + "weight_v", _POS + "parametrizations.weight.original1"): v for k, v in state.items()}
    param = root / FILES["parametrizations"]
    written.append(save_safetensors(renamed, param, dtype=torch.float32))
    (param.parent / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
    return written
