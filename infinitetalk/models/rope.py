"""Position encodings of the DiT: timestep sinusoid, 3-D video RoPE, 1-D speaker RoPE (L-RoPE).

Precision follows the reference: the sinusoid and the 3-D rotation angles are float64 (a float32
sinusoid alone costs ~4e-6 relative error at t≈1000); the 1-D speaker RoPE is float32 math. The rotations
themselves are `ops.fused` islands (one kernel each when fusion is on).
"""
from __future__ import annotations

import torch

from ..ops import fused

__all__ = ["timestep_sinusoid", "video_rope_tables", "apply_video_rope", "apply_rope_1d", "rope_axis_split"]

_THETA = 10000.0


def timestep_sinusoid(dim: int, t: torch.Tensor) -> torch.Tensor:
    """`[len(t), dim]` float64 embedding, `[cos | sin]`, frequencies 10000^(-i/(dim/2))."""
    half = dim // 2
    pos = t.to(torch.float64).reshape(-1)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=pos.device).div(half))
    angles = torch.outer(pos, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_axis_split(head_dim: int) -> tuple[int, int, int]:
    """Complex channels per axis (frame, height, width): c − 2·(c//3), c//3, c//3 with c = d/2 (22/21/21 at d=128)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _axis_angles(n: int, complex_dims: int, device) -> torch.Tensor:
    """`[n, complex_dims]` float64 angles pos · 10000^(−2i/(2·complex_dims))."""
    dim = 2 * complex_dims
    inv = 1.0 / torch.pow(_THETA, torch.arange(0, dim, 2, dtype=torch.float64, device=device).div(dim))
    return torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)


def video_rope_tables(grid: tuple[int, int, int], head_dim: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Unit rotations `[f·h·w, 1, head_dim/2, 2]` (cos, sin; float64) for tokens in (frame, row, col) order.

    Positions start at 0 on each axis; each axis has its own frequency ladder.
    """
    f, h, w = grid
    cf, ch, cw = rope_axis_split(head_dim)
    af, ah, aw = _axis_angles(f, cf, device), _axis_angles(h, ch, device), _axis_angles(w, cw, device)
    angles = torch.cat([
        af.view(f, 1, 1, cf).expand(f, h, w, cf),
        ah.view(1, h, 1, ch).expand(f, h, w, ch),
        aw.view(1, 1, w, cw).expand(f, h, w, cw),
    ], dim=-1).reshape(f * h * w, 1, cf + ch + cw)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


apply_video_rope = fused.rope_video


def apply_rope_1d(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """1-D RoPE (base 10000, adjacent pairs) on `x` `[..., d]`; `positions` broadcast against `x.shape[:-1]`.

    Float32 math like the reference; positions may be fractional (L-RoPE speaker positions)."""
    return fused.rope_1d(x, positions.to(device=x.device))
