"""Tiny random Wan2.1 VAE in the three layouts users have, under `<models>/vae/`:

- `Wan2.1_VAE.pth`               Wan-AI torch zip, fp32 (the reference's file),
- `wan_2.1_vae.safetensors`      Comfy-Org repackage, fp32, same names,
- `Wan2_1_VAE_bf16.safetensors`  Kijai, bf16, same names.

Real architecture (dim_mult, res blocks, temporal downsampling, z_dim 16), base width `spec.VAE_DIM`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoints.materialize import build_on_meta
from ..models.vae import VAEConfig, WanVAE
from .layouts import random_state_dict, save_pth, save_safetensors
from .spec import VAE_DIM, VAE_Z_DIM

__all__ = ["write", "state_dict", "TINY_VAE_CONFIG", "FILES"]

TINY_VAE_CONFIG = VAEConfig(dim=VAE_DIM, z_dim=VAE_Z_DIM)
FILES = {"wan_pth": "Wan2.1_VAE.pth", "comfy": "wan_2.1_vae.safetensors", "kijai_bf16": "Wan2_1_VAE_bf16.safetensors"}


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded float32 weights for the tiny VAE under the real key names."""
    return random_state_dict(build_on_meta(lambda: WanVAE(TINY_VAE_CONFIG)), seed=seed)


def write(models_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write every layout into `models_dir/vae/`; returns the paths written."""
    folder = Path(models_dir) / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict(seed)
    return [
        save_pth(sd, folder / FILES["wan_pth"]),
        save_safetensors(sd, folder / FILES["comfy"]),
        save_safetensors(sd, folder / FILES["kijai_bf16"], dtype=torch.bfloat16),
    ]
