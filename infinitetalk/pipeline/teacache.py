"""TeaCache-style step skipping for the quality recipe (3 guidance calls per step); off unless asked for.

Decision rule of the reference (InfiniteTalk `teacache_init` / forward), per guidance branch (cond, drop_text,
uncond) and denoising step:
- the "modulated input" is the time projection e0 `[1, 6, dim]` with retention steps, else the time embedding
  e `[1, dim]`;
- during the first `retention` steps (5 with retention steps, else 1) and from the `cutoff` step on (never with
  retention steps, else the last step) the blocks always run and the accumulated distance resets to 0;
- otherwise the relative L1 change of the modulated input since the branch's previous call, rescaled by the
  polynomial of the model size (coefficients below, highest power first), is added to the accumulated distance;
  below the threshold the blocks are skipped and the branch's last block residual (output − input of the block
  stack) is added to the tokens instead; at or above it the blocks run and the distance resets;
- the previous modulated input is updated on every call; a residual only when the blocks ran.
This is an approximation (it changes the result); the threshold trades speed for fidelity (0.2 ≈ 3× in the
reference's words, 0.1 ≈ 2×).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["TeaCache", "TEACACHE_COEFFICIENTS", "polynomial"]

# (model scale, retention steps) -> rescale polynomial, highest power first (the reference's values)
TEACACHE_COEFFICIENTS: dict[tuple[str, bool], tuple[float, ...]] = {
    ("480", True): (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01),
    ("720", True): (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02),
    ("480", False): (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01),
    ("720", False): (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}


def polynomial(coefficients: Sequence[float], x: float) -> float:
    """Σ c_i·x^(n−i) (highest power first), Horner's rule in float64."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


@dataclass
class _Branch:
    accumulated: float = 0.0
    previous: torch.Tensor | None = None
    residual: torch.Tensor | None = None   # [L_local, dim] of the last computed call


@dataclass
class TeaCache:
    """Skip state of one window's sampling. `scale`: "480" or "720" (coefficient set of the model size);
    `retention_steps`: the reference's `use_ret_steps`. `decisions` records (step, branch, computed)."""

    threshold: float = 0.2
    scale: str = "480"
    retention_steps: bool = False
    steps: int = 0
    decisions: list[tuple[int, int, bool]] = field(default_factory=list)
    _branches: dict[int, _Branch] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if (self.scale, self.retention_steps) not in TEACACHE_COEFFICIENTS:
            raise ValueError(f"TeaCache scale {self.scale!r} is not one of 480, 720")
        if not self.threshold >= 0:
            raise ValueError(f"TeaCache threshold {self.threshold} must be >= 0")

    @property
    def coefficients(self) -> tuple[float, ...]:
        return TEACACHE_COEFFICIENTS[(self.scale, self.retention_steps)]

    @property
    def retention(self) -> int:
        return 5 if self.retention_steps else 1

    @property
    def cutoff(self) -> int:
        return self.steps if self.retention_steps else self.steps - 1

    def start_window(self, steps: int) -> None:
        """Forget everything (each window starts from its own noise)."""
        self.steps = steps
        self._branches.clear()

    def decide(self, step: int, branch: int, modulated: torch.Tensor) -> bool:
        """Whether branch `branch` runs the blocks at `step` (and remember `modulated` for the next step)."""
        state = self._branches.setdefault(branch, _Branch())
        modulated = modulated.detach().float()
        if step < self.retention or step >= self.cutoff or state.previous is None:
            compute = True
        else:
            change = float((modulated - state.previous).abs().mean() / state.previous.abs().mean())
            state.accumulated += polynomial(self.coefficients, change)
            compute = state.accumulated >= self.threshold
        if compute:
            state.accumulated = 0.0
        state.previous = modulated.clone()
        self.decisions.append((step, branch, compute))
        return compute

    def for_calls(self, step: int, branches: Sequence[int]) -> _BlockCache:
        """The DiT hook for one pass whose batch rows are the guidance branches `branches`."""
        return _BlockCache(self, step, tuple(branches))


@dataclass
class _BlockCache:
    """Passed to `InfiniteTalkDiT.forward(..., block_cache=...)`: runs or skips the block stack per batch row."""

    cache: TeaCache
    step: int
    branches: tuple[int, ...]

    def run(self, tokens: torch.Tensor, e0: torch.Tensor, e: torch.Tensor,
            blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`tokens` `[B, L, dim]` before the blocks -> after (computed, or input + cached residual)."""
        modulated = e0 if self.cache.retention_steps else e
        compute = [self.cache.decide(self.step, b, modulated) for b in self.branches]
        states = [self.cache._branches[b] for b in self.branches]
        if not any(compute):
            return tokens + torch.stack([s.residual for s in states]).to(tokens.dtype)
        out = blocks(tokens)
        rows = []
        for i, (state, computed) in enumerate(zip(states, compute)):
            if computed:
                state.residual = out[i] - tokens[i]
                rows.append(out[i])
            else:
                rows.append(tokens[i] + state.residual.to(tokens.dtype))
        return torch.stack(rows)
