"""Tiny random CLIP ViT image encoder in the layouts users have, under `<models>/clip_vision/`:

- `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`  Wan-AI torch file, fp16: the whole XLM-R CLIP
  (`visual.*` incl. the unused last block / post_norm / head, a little `textual.*`, `log_scale`),
- `clip_vision_h.safetensors`  Comfy-Org, fp16, HF CLIPVisionModel names (`vision_model.*`, `visual_projection`).

224 px / patch 14 (257 tokens) as the real ViT-H/14; width, heads, depth from `spec.py`. The head count,
which no shape tells, travels as `infinitetalk.num_heads` (safetensors metadata; a scalar tensor in the .pth).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..checkpoints.materialize import build_on_meta
from ..models.clip_vision import ClipVisionConfig, ClipVisionEncoder
from .layouts import random_state_dict, save_pth, save_safetensors
from .spec import CLIP_DIM, CLIP_HEADS, CLIP_LAYERS, CLIP_MLP_RATIO

__all__ = ["write", "TINY_CLIP_CONFIG", "FILES", "state_dict", "hf_state_dict"]

TINY_CLIP_CONFIG = ClipVisionConfig(dim=CLIP_DIM, patch_size=14, image_size=224, num_heads=CLIP_HEADS,
                                    num_layers=CLIP_LAYERS, mlp_dim=int(CLIP_DIM * CLIP_MLP_RATIO))
FILES = {"wan_pth": "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "comfy": "clip_vision_h.safetensors"}
_OUT_DIM = 24  # width of the (unused) projection head
_HEADS_KEY = "infinitetalk.num_heads"


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded float32 visual tower under the open-clip names inside `visual.` (all blocks, post_norm, head)."""
    full = ClipVisionConfig(**{**TINY_CLIP_CONFIG.__dict__, "skip_last_block": False})
    sd = random_state_dict(build_on_meta(lambda: ClipVisionEncoder(full)), seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    sd["post_norm.weight"] = 1 + 0.1 * (torch.rand(CLIP_DIM, generator=g) * 2 - 1)
    sd["post_norm.bias"] = 0.05 * torch.randn(CLIP_DIM, generator=g)
    sd["head"] = torch.randn(CLIP_DIM, _OUT_DIM, generator=g) / math.sqrt(CLIP_DIM)
    return sd


def hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under HF CLIPVisionModel names (q/k/v split, vectors unflattened)."""
    dim = sd["pos_embedding"].shape[-1]
    out = {
        "vision_model.embeddings.patch_embedding.weight": sd["patch_embedding.weight"],
        "vision_model.embeddings.class_embedding": sd["cls_embedding"].reshape(dim),
        "vision_model.embeddings.position_embedding.weight": sd["pos_embedding"].reshape(-1, dim),
        "vision_model.embeddings.position_ids": torch.arange(sd["pos_embedding"].shape[1])[None],
        "visual_projection.weight": sd["head"].t().contiguous(),
    }
    for p in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{p}"] = sd[f"pre_norm.{p}"]
        out[f"vision_model.post_layernorm.{p}"] = sd[f"post_norm.{p}"]
    for i in range(TINY_CLIP_CONFIG.num_layers):
        src, dst = f"transformer.{i}.", f"vision_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            for mine, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                                 ("attn.proj", "self_attn.out_proj"), ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
                out[f"{dst}{theirs}.{p}"] = sd[f"{src}{mine}.{p}"]
            for name, part in zip("qkv", sd[f"{src}attn.to_qkv.{p}"].chunk(3, dim=0)):
                out[f"{dst}self_attn.{name}_proj.{p}"] = part.contiguous()
    return out


def _textual_junk(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 11)
    return {
        "textual.token_embedding.weight": torch.randn(40, 16, generator=g),
        "textual.blocks.0.attn.q.weight": torch.randn(16, 16, generator=g),
        "textual.head.0.weight": torch.randn(20, 16, generator=g),
        "log_scale": torch.tensor(math.log(1 / 0.07)),
    }


def write(models_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write both layouts into `models_dir/clip_vision/`; returns the paths written."""
    folder = Path(models_dir) / "clip_vision"
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict(seed)
    wan = {"visual." + k: v for k, v in sd.items()} | _textual_junk(seed)
    wan[_HEADS_KEY] = torch.tensor(CLIP_HEADS)
    return [
        save_pth(wan, folder / FILES["wan_pth"], dtype=torch.float16),
        save_safetensors(hf_state_dict(sd), folder / FILES["comfy"], dtype=torch.float16,
                         metadata={_HEADS_KEY: CLIP_HEADS}),
    ]
