"""Guided flow-matching sampling of one window (reference `wan/multitalk.py`, the per-chunk step loop).

Guidance (reference §5.3), per step at time t:
- quality (text_scale != 1), 3 model calls:
  `v = uncond + s_t·(cond − drop_text) + s_a·(drop_text − uncond)`, where `cond` = (prompt, audio),
  `drop_text` = (negative prompt, audio), `uncond` = (negative prompt, ONE zero-audio person).
- fast (text_scale == 1, distill LoRA), 2 model calls:
  `v = drop_audio + s_a·(cond − drop_audio)`, `drop_audio` = (prompt, one zero-audio person).

Every step the clean motion latents are written back over the first latent frames (InfiniteTalk keeps them
clean; MultiTalk's re-noising is dead code there). An optional keep region (mask-limited generation) pins
everything outside the mask to the source latents, re-noised to the next step's noise level, so it ends
exactly at the source.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .schedule import euler_step

DiTCall = Callable[..., torch.Tensor]  # InfiniteTalkDiT.forward(x, t, context, clip_fea, y, audio, masks)

__all__ = ["Guidance", "WindowConditioning", "KeepRegion", "guided_velocity", "sample_window", "window_noise"]


@dataclass(frozen=True)
class Guidance:
    text_scale: float
    audio_scale: float

    @property
    def text_free(self) -> bool:
        """True for the 2-call recipe (distill LoRA, text guidance off)."""
        return math.isclose(self.text_scale, 1.0)

    @property
    def calls_per_step(self) -> int:
        return 2 if self.text_free else 3


@dataclass
class WindowConditioning:
    """What the DiT sees besides the noisy latent, for one window (all on the compute device)."""

    context: torch.Tensor          # [L, text_dim] prompt embedding (unpadded)
    context_null: torch.Tensor     # [L', text_dim] negative-prompt embedding
    clip_fea: torch.Tensor         # [1, 257, img_dim]
    y: torch.Tensor                # [20, T, h, w]: 4 first-frame mask channels + 16 reference latent channels
    audio: torch.Tensor            # [H, 4(T−1)+1, 5, L_a, C_a]
    ref_target_masks: torch.Tensor  # [3, h, w]: speaker 1, speaker 2, background

    @property
    def silent_audio(self) -> torch.Tensor:
        """One zero-audio person (the reference's null-audio pass is single-person even for two speakers)."""
        return torch.zeros_like(self.audio[-1:])


@dataclass
class KeepRegion:
    """Pixels that must not move: `mask` 1 = generate, 0 = keep `latents` (the clean source)."""

    latents: torch.Tensor  # [16, T, h, w] clean source latents
    mask: torch.Tensor     # [1, T or 1, h, w] in [0, 1]

    def impose(self, x: torch.Tensor, noise: torch.Tensor, sigma: float, first: int) -> torch.Tensor:
        """Replace the kept part of latent frames `first:` by the source at noise level sigma."""
        src = (1.0 - sigma) * self.latents[:, first:] + sigma * noise[:, first:]
        m = self.mask if self.mask.shape[1] == 1 else self.mask[:, first:]
        x = x.clone()
        x[:, first:] = m * x[:, first:] + (1.0 - m) * src
        return x


def window_noise(seed: int, window_index: int, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """The initial noise of one window: a CPU generator seeded from (seed, window) so that resume and any
    device reproduce it exactly."""
    g = torch.Generator(device="cpu").manual_seed((int(seed) << 20) + int(window_index))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device)


def _model(dit: DiTCall, x, t, context, cond: WindowConditioning, audio) -> torch.Tensor:
    return dit(x, t, context, cond.clip_fea, cond.y, audio, cond.ref_target_masks).float()


def guided_velocity(dit: DiTCall, x: torch.Tensor, t: torch.Tensor, cond: WindowConditioning,
                    guidance: Guidance) -> torch.Tensor:
    """The guided flow velocity at time t (2 or 3 model calls)."""
    v_cond = _model(dit, x, t, cond.context, cond, cond.audio)
    if guidance.text_free:
        v_drop_audio = _model(dit, x, t, cond.context, cond, cond.silent_audio)
        return v_drop_audio + guidance.audio_scale * (v_cond - v_drop_audio)
    v_drop_text = _model(dit, x, t, cond.context_null, cond, cond.audio)
    v_uncond = _model(dit, x, t, cond.context_null, cond, cond.silent_audio)
    return (v_uncond + guidance.text_scale * (v_cond - v_drop_text)
            + guidance.audio_scale * (v_drop_text - v_uncond))


@torch.no_grad()
def sample_window(
    dit: DiTCall,
    noise: torch.Tensor,
    cond: WindowConditioning,
    times: torch.Tensor,
    guidance: Guidance,
    motion: torch.Tensor,
    keep: KeepRegion | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoise one window from `noise` [16, T, h, w] along `times` (S+1 values, 1000 → 0).

    motion: clean latents [16, n, h, w] re-imposed on the first n latent frames before every model call and
    at the end. `on_step(i)` runs after step i (progress, cancellation).
    """
    n_motion = motion.shape[1]
    x = noise.clone()
    steps = times.numel() - 1
    for i in range(steps):
        x[:, :n_motion] = motion
        t = times[i].reshape(1).to(x.device)
        v = guided_velocity(dit, x, t, cond, guidance)
        x = euler_step(x, v, times[i], times[i + 1])
        if keep is not None:
            x = keep.impose(x, noise, float(times[i + 1]) / 1000.0, n_motion)
        x[:, :n_motion] = motion
        if on_step is not None:
            on_step(i)
    return x
