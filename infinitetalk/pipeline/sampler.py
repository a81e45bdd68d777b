"""Guided flow-matching sampling of one window (reference `wan/multitalk.py`, the per-chunk step loop).

Guidance (reference §5.3), per step at time t:
- quality (text_scale != 1), 3 model calls:
  `v = uncond + s_t·(cond − drop_text) + s_a·(drop_text − uncond)`, where `cond` = (prompt, audio),
  `drop_text` = (negative prompt, audio), `uncond` = (negative prompt, ONE zero-audio person).
- fast (text_scale == 1, distill LoRA), 2 model calls:
  `v = drop_audio + s_a·(cond − drop_audio)`, `drop_audio` = (prompt, one zero-audio person).
- unguided (text_scale == audio_scale == 1, the 4-step distilled DiT; LightX2V's `enable_cfg` false), 1 call:
  `v = cond` — what both formulas give at scale 1, without computing the passes that cancel out.

Every step the clean motion latents are written back over the first latent frames (InfiniteTalk keeps them
clean; MultiTalk's re-noising is dead code there). An optional keep region (mask-limited generation) pins
everything outside the mask to the source latents, re-noised to the next step's noise level, so it ends
exactly at the source.

Speed without changing the maths: `batch` runs up to that many of a step's guidance calls as one DiT batch
(`InfiniteTalkDiT.forward_batch`); `parallel` (a `ops.parallel.ParallelState`) spreads the calls over
rank groups and splits each call's tokens over the ranks of its group (see docs/dit.md, "Parallel").
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .schedule import euler_step

if TYPE_CHECKING:
    from ..ops.parallel import ParallelState
    from ..runtime.budget import JobShape
    from .teacache import TeaCache

DiTCall = Callable[..., torch.Tensor]  # InfiniteTalkDiT.forward(x, t, context, clip_fea, y, audio, masks)

__all__ = ["Guidance", "WindowConditioning", "KeepRegion", "guided_velocity", "guidance_calls", "combine_guidance",
           "sample_window", "window_noise", "WindowSampler"]


@dataclass(frozen=True)
class Guidance:
    text_scale: float
    audio_scale: float

    @property
    def text_free(self) -> bool:
        """True for the 1- and 2-call recipes (text guidance off)."""
        return math.isclose(self.text_scale, 1.0)

    @property
    def unguided(self) -> bool:
        """True for the 1-call recipe: text and audio guidance both off (the conditional velocity alone)."""
        return self.text_free and math.isclose(self.audio_scale, 1.0)

    @property
    def calls_per_step(self) -> int:
        return 1 if self.unguided else 2 if self.text_free else 3


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


def guidance_calls(cond: WindowConditioning, guidance: Guidance) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (context, audio) of each model call of a step: unguided = [cond]; fast = [cond, drop_audio];
    quality = [cond, drop_text, uncond]."""
    if guidance.unguided:
        return [(cond.context, cond.audio)]
    if guidance.text_free:
        return [(cond.context, cond.audio), (cond.context, cond.silent_audio)]
    return [(cond.context, cond.audio), (cond.context_null, cond.audio), (cond.context_null, cond.silent_audio)]


def combine_guidance(velocities: list[torch.Tensor], guidance: Guidance) -> torch.Tensor:
    """The guided velocity from the calls' velocities (order of `guidance_calls`)."""
    if guidance.unguided:
        return velocities[0]
    if guidance.text_free:
        v_cond, v_drop_audio = velocities
        return v_drop_audio + guidance.audio_scale * (v_cond - v_drop_audio)
    v_cond, v_drop_text, v_uncond = velocities
    return (v_uncond + guidance.text_scale * (v_cond - v_drop_text)
            + guidance.audio_scale * (v_drop_text - v_uncond))


def _run_calls(dit: DiTCall, x, t, cond: WindowConditioning, calls: list[tuple[torch.Tensor, torch.Tensor]],
               indices: Sequence[int], batch: int, sequence: Any, skip: tuple[TeaCache, int] | None
               ) -> list[torch.Tensor]:
    """Velocities of `calls` (the step's calls number `indices`), `batch` at a time (one `forward_batch` per
    group of calls); `skip` = (TeaCache, step) or None."""
    extra = {} if sequence is None else {"sequence": sequence}
    out: list[torch.Tensor] = []
    for i in range(0, len(calls), batch):
        group = calls[i:i + batch]
        if skip is not None:
            extra["block_cache"] = skip[0].for_calls(skip[1], indices[i:i + batch])
        if len(group) == 1:
            context, audio = group[0]
            out.append(dit(x, t, context, cond.clip_fea, cond.y, audio, cond.ref_target_masks, **extra).float())
        else:
            contexts, audios = [c for c, _ in group], [a for _, a in group]
            v = dit.forward_batch(x, t, contexts, cond.clip_fea, cond.y, audios, cond.ref_target_masks, **extra)
            out.extend(v.float().unbind(0))
    return out


def _batch_size(batch: int | bool, calls: int) -> int:
    if batch is True:
        return calls
    if batch is False:
        return 1
    if int(batch) < 1:
        raise ValueError(f"guidance batch must be >= 1 (or True/False), got {batch}")
    return int(batch)


def guided_velocity(dit: DiTCall, x: torch.Tensor, t: torch.Tensor, cond: WindowConditioning,
                    guidance: Guidance, batch: int | bool = 1, parallel: ParallelState | None = None,
                    skip: tuple[TeaCache, int] | None = None) -> torch.Tensor:
    """The guided flow velocity at time t (1, 2 or 3 model calls; `batch` of them per DiT pass). With
    `parallel` (a `ParallelState`) this is a collective: every rank returns the same velocity.
    `skip`: (TeaCache, step index) for step skipping."""
    calls = guidance_calls(cond, guidance)
    size = _batch_size(batch, len(calls))
    if parallel is None or parallel.world_size == 1:
        return combine_guidance(_run_calls(dit, x, t, cond, calls, range(len(calls)), size, None, skip), guidance)
    layout = parallel.layout(len(calls), dit.config.num_heads)
    mine = _run_calls(dit, x, t, cond, [calls[i] for i in layout.calls], layout.calls, size, layout.sequence, skip)
    velocities = parallel.combine(dict(zip(layout.calls, mine)), layout, len(calls), x)
    return combine_guidance(velocities, guidance)


class WindowSampler(Protocol):
    """What `generate` calls instead of `sample_window` when several processes sample each window together
    (multigpu/: torchrun rank 0, the ComfyUI worker pool). It plans its own guidance batch, and declares
    what it can do rather than being inspected."""

    step_skipping: bool   # accepts `teacache=` (TeaCache step skipping)

    def job_share(self, job: JobShape, num_heads: int | None) -> JobShape:
        """The share of a window this process computes (runtime/plan.py `job_on_rank`): what it plans for."""
        ...

    def __call__(self, dit: DiTCall, noise: torch.Tensor, cond: WindowConditioning, times: torch.Tensor,
                 guidance: Guidance, motion: torch.Tensor, keep: KeepRegion | None = None,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor: ...


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
    batch: int | bool = 1,
    parallel: ParallelState | None = None,
    teacache: TeaCache | None = None,
) -> torch.Tensor:
    """Denoise one window from `noise` [16, T, h, w] along `times` (S+1 values, 1000 → 0).

    motion: clean latents [16, n, h, w] re-imposed on the first n latent frames before every model call and
    at the end. `on_step(i)` runs after step i (progress, cancellation). `batch`: guidance calls per DiT
    pass (True = all, 1/False = one at a time; same result). `parallel`: a `ops.parallel.ParallelState`;
    then this is a collective — every rank calls it with equal arguments (except `batch`: the smallest over
    the ranks is used) and every rank returns the same latent.
    `teacache`: a `pipeline.teacache.TeaCache` (quality recipe only) skips block stacks on slowly changing steps
    (an approximation; its `decisions` record what ran).
    """
    if teacache is not None:
        if guidance.text_free:
            raise ValueError("TeaCache step skipping follows the reference's 3-call (quality) recipe; "
                             f"this guidance makes {guidance.calls_per_step} calls per step")
        teacache.start_window(times.numel() - 1)
    if parallel is not None and parallel.world_size > 1:   # ranks' memory plans may allow different batches
        batch = parallel.smallest(_batch_size(batch, guidance.calls_per_step))
    n_motion = motion.shape[1]
    x = noise.clone()
    steps = times.numel() - 1
    for i in range(steps):
        x[:, :n_motion] = motion
        t = times[i].reshape(1).to(x.device)
        v = guided_velocity(dit, x, t, cond, guidance, batch, parallel, None if teacache is None else (teacache, i))
        x = euler_step(x, v, times[i], times[i + 1])
        if keep is not None:
            x = keep.impose(x, noise, float(times[i + 1]) / 1000.0, n_motion)
        x[:, :n_motion] = motion
        if on_step is not None:
            on_step(i)
    return x
