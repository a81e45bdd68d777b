"""CLIP ViT image encoder as Wan uses it: the open-clip visual tower, penultimate block output.

Wan conditions the DiT on the 257 tokens (cls + 16x16 patches) that come out of block L-2 of the
ViT-H/14 (`use_31_block=True`): no post-norm, no projection head. Those are therefore not part of
this module; the loader ignores them. State-dict names are the open-clip names inside `visual.`
(the loader strips that prefix or maps HF-CLIP names onto these).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear

__all__ = ["ClipVisionConfig", "ClipVisionEncoder", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipVisionConfig:
    """Sizes of the ViT; defaults are ViT-H/14 at 224 px. `num_layers` counts the blocks in the file."""

    dim: int = 1280
    patch_size: int = 14
    image_size: int = 224
    num_heads: int = 16
    num_layers: int = 32
    mlp_dim: int = 5120
    eps: float = 1e-5
    skip_last_block: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @property
    def used_layers(self) -> int:
        return self.num_layers - 1 if self.skip_last_block else self.num_layers

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (as the reference does under autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class ClipAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.to_qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ClipBlock(nn.Module):
    """Pre-norm transformer block with an exact-GELU MLP (`mlp.0`, `mlp.2`)."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = ClipAttention(cfg.dim, cfg.num_heads)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = nn.Sequential(Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), Linear(cfg.mlp_dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClipVisionEncoder(nn.Module):
    """image [3, H, W] (or [B, 3, H, W]) in [-1, 1] -> tokens [257, dim] (or [B, 257, dim]).

    Preprocessing is part of the forward so every caller feeds the same thing the reference does:
    bicubic squash to image_size x image_size (no crop, no antialias, no clamp), [-1,1] -> [0,1], CLIP
    mean/std. Computes in the dtype of `pos_embedding` (the storage dtype chosen at load time).
    """

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, cfg.num_tokens, cfg.dim))
        self.pre_norm = LayerNorm(cfg.dim, eps=cfg.eps)
        self.transformer = nn.Sequential(*(ClipBlock(cfg) for _ in range(cfg.used_layers)))

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.pos_embedding.device

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised [B, 3, S, S] float32."""
        cfg = self.config
        x = image.to(device=self.device, dtype=torch.float32)
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bicubic", align_corners=False)
        x = x * 0.5 + 0.5
        mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        single = image.dim() == 3
        if single:
            image = image[None]
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"expected an image [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
        dtype = self.dtype
        x = self.preprocess(image).to(dtype)
        x = F.conv2d(x, self.patch_embedding.weight.to(dtype), stride=self.config.patch_size)
        x = x.flatten(2).transpose(1, 2)
        cls = self.cls_embedding.to(dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding.to(dtype)
        x = self.pre_norm(x)
        x = self.transformer(x)
        return x[0] if single else x
