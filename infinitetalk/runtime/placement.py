"""Applying a placement decision (budget.py) to loaded modules: which DiT blocks stream from host memory
(streaming.py) and which encoders visit the device only while they run, the DiT's resident part stepping
aside to the host when a visit would not fit beside it. The pipeline's `ModelBundle` calls these per job.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .budget import DiTWeights, Placement
from .plan import MemoryPlan
from .streaming import BlockStreamer

__all__ = ["BlockPlacement", "visiting"]


class BlockPlacement:
    """Where the DiT's blocks live on `device`: exactly the streamed blocks of the last applied placement
    stream, every other block and child sits on the device."""

    def __init__(self, dit: nn.Module, device: torch.device):
        self.dit, self.device = dit, device
        self.streamer: BlockStreamer | None = None
        self.applied = False
        self.evict_for: frozenset[str] = frozenset()   # visitors that do not fit beside the resident DiT

    def apply(self, plan: MemoryPlan, weights: DiTWeights, budget: int | None) -> None:
        """Move blocks to `plan.placement` and note which encoder visits must send the DiT to the host
        (`weights`: the DiT's sizes the plan was made from; `budget`: bytes allowed on the device, None = all)."""
        self._place(plan.placement)
        resident = weights.other_bytes + sum(b for i, b in enumerate(weights.block_bytes)
                                             if i not in plan.placement.streamed)
        self.evict_for = frozenset(name for name, peak in plan.visit_peaks.items()
                                   if budget is not None and peak + resident > budget)

    def release(self) -> None:
        """Every block back on the host and no streaming: the next `apply` places the DiT anew."""
        if self.streamer is not None:
            self.streamer.remove(device="cpu")
            self.streamer = None
        self.applied = False

    def _place(self, placement: Placement) -> None:
        want = tuple(placement.streamed)
        current = self.streamer.streamed if self.streamer is not None else ()
        if self.applied and want == current:
            return
        self.applied = True
        if self.streamer is not None:
            self.streamer.remove(device="cpu")
            self.streamer = None
        if want:   # first off the device, then the rest onto it: never both sets at once
            self.streamer = BlockStreamer(self.dit.blocks, want, self.device, placement.prefetch).install()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for name, child in self.dit.named_children():
            if name != "blocks":
                child.to(self.device)
        for i, block in enumerate(self.dit.blocks):
            if i not in want:
                block.to(self.device)


@contextmanager
def visiting(module: nn.Module, device: torch.device, evict: nn.Module | None = None) -> Iterator[nn.Module]:
    """`module` on `device` while the block runs and back on the CPU after; `evict` (the DiT, when the visit
    does not fit beside its resident part) waits on the host meanwhile."""
    if evict is not None:
        evict.to("cpu")
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        if evict is not None:
            evict.to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
