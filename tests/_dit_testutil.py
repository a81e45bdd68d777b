"""Random tiny InfiniteTalk DiTs and inputs for the dit tests (no files needed)."""
from __future__ import annotations

import math

import torch

from infinitetalk.checkpoints import build_on_meta, load_module
from infinitetalk.models.dit import DiTConfig, InfiniteTalkDiT

SMALL = dict(dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=32, image_dim=24,
             intermediate_dim=8, output_dim=16, context_tokens=3, audio_layers=2, audio_channels=8)


def small_config(**overrides) -> DiTConfig:
    return DiTConfig(**{**SMALL, **overrides})


def random_state(cfg: DiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter drawn like the golden cases: weights 1/√fan_in, biases 0.05, norm scales 1±0.1."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in build_on_meta(lambda: InfiniteTalkDiT(cfg)).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if "modulation" in name:
            t = torch.randn(shape, generator=g) * 0.3
        elif len(shape) >= 2:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("bias"):
            t = torch.randn(shape, generator=g) * 0.05
        else:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        state[name] = t
    return state


def random_model(cfg: DiTConfig, seed: int = 0, dtype=torch.float32, attention: str = "sdpa") -> InfiniteTalkDiT:
    model = build_on_meta(lambda: InfiniteTalkDiT(cfg, compute_dtype=dtype, attention=attention))
    return load_module(model, random_state(cfg, seed), dtype=dtype)


def random_inputs(cfg: DiTConfig, persons: int = 1, frames: int = 3, h: int = 8, w: int = 8, seed: int = 1,
                  text_tokens: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, h, w)
    masks[0, : h * 3 // 4, : w // 2] = 1
    masks[1, : h * 3 // 4, w // 2:] = 1
    masks[2, h * 3 // 4:] = 1
    return dict(
        x=torch.randn(cfg.out_dim, frames, h, w, generator=g),
        t=torch.tensor([700.0]),
        context=torch.randn(text_tokens, cfg.text_dim, generator=g),
        clip_fea=torch.randn(1, 257, cfg.image_dim, generator=g),
        y=torch.randn(cfg.in_dim - cfg.out_dim, frames, h, w, generator=g),
        audio=torch.randn(persons, cfg.vae_scale * (frames - 1) + 1, cfg.audio_window, cfg.audio_layers,
                          cfg.audio_channels, generator=g),
        ref_target_masks=masks,
    )


def run(model: InfiniteTalkDiT, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs["x"], inputs["t"], inputs["context"], inputs["clip_fea"], inputs["y"], inputs["audio"],
                     inputs["ref_target_masks"])
