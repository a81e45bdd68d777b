"""Golden kind `clip_vision`: the open-clip visual tower through the real loader, penultimate tokens."""
from __future__ import annotations

import torch

from ...loaders.clip_vision import load_clip_vision
from ...models.clip_vision import ClipVisionConfig
from ..runner import Case, Outputs


def config_from_case(cfg: dict) -> ClipVisionConfig:
    """The reference's VisionTransformer arguments (+ use_31_block, resize, mean, std) -> ClipVisionConfig."""
    if not cfg.get("pre_norm", True) or cfg.get("post_norm", False) or cfg.get("activation", "gelu") != "gelu":
        raise ValueError("only the ViT-H style tower (pre_norm, pre-norm blocks, exact GELU) is supported")
    if cfg.get("pool_type", "token") != "token":
        raise ValueError(f"pool_type {cfg['pool_type']!r} not supported (Wan uses 'token')")
    resize = cfg.get("resize") or [cfg["image_size"]] * 2
    if resize[0] != resize[1] or resize[0] != cfg["image_size"]:
        raise ValueError(f"resize {resize} differs from image_size {cfg['image_size']}")
    dim = cfg["dim"]
    return ClipVisionConfig(
        dim=dim, patch_size=cfg["patch_size"], image_size=cfg["image_size"], num_heads=cfg["num_heads"],
        num_layers=cfg["num_layers"], mlp_dim=int(dim * cfg["mlp_ratio"]), eps=cfg.get("norm_eps", 1e-5),
        skip_last_block=bool(cfg.get("use_31_block", True)),
        mean=tuple(cfg.get("mean", ClipVisionConfig.mean)), std=tuple(cfg.get("std", ClipVisionConfig.std)))


def run(case: Case) -> Outputs:
    model = load_clip_vision(case.weights_path, config=config_from_case(case.config), dtype=torch.float32)
    return Outputs(tensors={"clip_fea": model(case.inputs()["image"])})
