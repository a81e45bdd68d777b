"""Flow-matching sampler schedule: shifted timesteps and the Euler update (reference `wan/multitalk.py`)."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError

__all__ = ["SHIFT_BY_RESOLUTION", "shift_for", "timesteps", "euler_step"]

# Default shift per resolution bucket family (the reference's `--sample_shift` for each `--size`).
SHIFT_BY_RESOLUTION: dict[str, float] = {"480p": 7.0, "720p": 11.0}


def shift_for(resolution: str) -> float:
    """Default timestep shift for a resolution name ('480p' or '720p')."""
    try:
        return SHIFT_BY_RESOLUTION[resolution]
    except KeyError:
        raise InputError("resolution", f"expected one of {', '.join(SHIFT_BY_RESOLUTION)}, got {resolution!r}") from None


def timesteps(steps: int, shift: float, num_timesteps: int = 1000) -> torch.Tensor:
    """The S+1 model times (float32, 1000 -> 0) for `steps` Euler steps.

    `linspace(num_timesteps, 1, steps)` in float32, then 0 appended, each value mapped by
    `T·s·σ/(1+(s−1)σ)` with σ = t/T (float32 arithmetic, as the reference does on numpy float32).
    The first S values are the times given to the model; the last is the final target time 0.
    """
    if int(steps) < 1:
            raise InputError("steps", f"expected a positive number of sampling steps, got {steps}")
    t = np.linspace(num_timesteps, 1, int(steps), dtype=np.float32)
    t = np.concatenate([t, np.zeros(1, dtype=np.float32)])
    sigma = t / np.float32(num_timesteps)
    s = np.float32(shift)
    shifted = s * sigma / (np.float32(1) + (s - np.float32(1)) * sigma) * np.float32(num_timesteps)
    return torch.from_numpy(shifted.astype(np.float32))


def euler_step(x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor,
               num_timesteps: int = 1000) -> torch.Tensor:
    """One flow-matching Euler step: x + (−v)·dt with dt = (t − t_next)/num_timesteps (v ≈ noise − x0).

    dt is formed in float32 like the reference (its timesteps are float32 tensors); the update is computed in
    float32 (at least) and returned in x's dtype.
    """
    t32 = torch.as_tensor(t, dtype=torch.float32).reshape(())
    tn32 = torch.as_tensor(t_next, dtype=torch.float32).reshape(())
    dt = (t32 - tn32) / num_timesteps
    work = torch.promote_types(x.dtype, torch.float32)
    out = x.to(work) - v.to(work) * dt.to(device=x.device, dtype=work)
    return out.to(x.dtype)
