"""Multi-process DiT: guidance parallelism and Ulysses sequence parallelism over torch.distributed.

Layout for one denoising step with C guidance calls (2 fast, 3 quality) on W ranks:
- guidance groups: when W is a multiple of C (and guidance parallelism is on), the ranks split into C groups
  of W/C consecutive ranks; group g computes call g. Otherwise one group of all W ranks runs every call.
- sequence parallelism inside a group of P ranks: each rank holds 1/P of the window's tokens (padded to a
  multiple of P); self-attention swaps tokens for heads with an all-to-all (Ulysses), so P must divide the
  head count. When the layouts above do not divide it, G < C groups (G dividing W) take the calls in turn
  (group g: calls g, g+G, …); when none of those fits either (W = 3 with 2 calls, W = 7 with 3, with 40
  heads), G groups of P ranks with G·P < W do, and the ranks left over add zeros — never a silent wrong
  answer, and no refusal of a world size a user may simply have at hand.
- the velocities of all calls are summed across the world (each call contributed by exactly one rank, the
  others add zeros: exact), so every rank ends the step with the same latent.

`sample_window(..., parallel=state)` is a collective: every rank of `state` calls it with equal arguments
and every rank returns the same latent.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import InputError

__all__ = ["ParallelState", "SequenceGroup", "GuidanceLayout", "init_parallel", "guidance_layout"]


@dataclass
class SequenceGroup:
    """The ranks that share one model call: token shards, all-to-all between tokens and heads.

    Passed to `InfiniteTalkDiT.forward(..., sequence=...)`; the model only calls the methods below."""

    group: object | None   # torch.distributed ProcessGroup (None = the default world group)
    rank: int              # index inside the group
    size: int              # ranks in the group

    def padded(self, n_tokens: int) -> int:
        """Token count rounded up to a multiple of the group size."""
        return -(-n_tokens // self.size) * self.size

    def local_range(self, n_tokens: int) -> tuple[int, int]:
        """[start, stop) of this rank's shard in the padded sequence."""
        per = self.padded(n_tokens) // self.size
        return self.rank * per, (self.rank + 1) * per

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of `x` along `dim` (zero-padded to a multiple of the group size first)."""
        start, stop = self.local_range(x.shape[dim])
        x = _pad_to(x, self.padded(x.shape[dim]), dim)
        return x.narrow(dim, start, stop - start)

    def gather(self, x: torch.Tensor, n_tokens: int, dim: int = 1) -> torch.Tensor:
        """All shards concatenated along `dim`, padding stripped: the full sequence on every rank."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, n_tokens)

    def tokens_to_heads(self, x: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """`[B, L_local, heads, d]` -> `[B, n_tokens, heads/P, d]` (all-to-all; padding stripped)."""
        b, n_local, heads, d = x.shape
        p = self.size
        send = x.reshape(b, n_local, p, heads // p, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)  # [P (source rank = token shard), B, L_local, heads/P, d]
        dist.all_to_all_single(recv, send, group=self.group)
        out = recv.permute(1, 0, 2, 3, 4).reshape(b, p * n_local, heads // p, d)
        return out[:, :n_tokens]

    def heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, n_tokens, heads/P, d]` -> `[B, L_local, heads, d]` (the inverse all-to-all)."""
        b, n_tokens, heads_local, d = x.shape
        p = self.size
        x = _pad_to(x, self.padded(n_tokens), 1)
        n_local = x.shape[1] // p
        send = x.reshape(b, p, n_local, heads_local, d).permute(1, 0, 2, 3, 4).contiguous()
        recv = torch.empty_like(send)  # [P (source rank = head chunk), B, L_local, heads/P, d]
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, n_local, p * heads_local, d)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group (in place, returned)."""
        dist.all_reduce(x, group=self.group)
        return x


@dataclass(frozen=True)
class GuidanceLayout:
    """Which guidance calls this rank computes, and with which sequence group."""

    calls: tuple[int, ...]          # indices into the step's call list computed by this rank's group
    sequence: SequenceGroup | None  # None = one rank computes the whole call
    contributes: bool               # True on the one rank per group that adds the group's result to the sum


@dataclass
class ParallelState:
    """The process world after `init_parallel`: rank, size, device and the cached group layouts."""

    rank: int
    world_size: int
    device: torch.device
    guidance_parallel: bool = True
    _layouts: dict = field(default_factory=dict, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0 does the I/O (reading inputs, writing video, progress)."""
        return self.rank == 0

    def layout(self, calls_per_step: int, num_heads: int) -> GuidanceLayout:
        """The (cached) layout for `calls_per_step` guidance calls; a collective the first time (new groups).

        Raises InputError("world_size") when a sequence group would not divide the head count."""
        n_groups, size = guidance_layout(self.world_size, calls_per_step, self.guidance_parallel, num_heads)
        key = (n_groups, size)
        if key not in self._layouts:
            groups = [list(range(g * size, (g + 1) * size)) for g in range(n_groups)]
            handles = [None if len(r) == self.world_size else dist.new_group(r) if len(r) > 1 else None
                       for r in groups]  # every rank creates every group, in the same order
            self._layouts[key] = handles
        index = self.rank // size
        if index >= n_groups:   # a rank left over by the layout (see guidance_layout): adds zeros to the sum
            return GuidanceLayout((), None, contributes=False)
        sequence = SequenceGroup(self._layouts[key][index], self.rank % size, size) if size > 1 else None
        calls = tuple(range(index, calls_per_step, n_groups))
        return GuidanceLayout(calls, sequence, contributes=self.rank % size == 0)

    def combine(self, velocities: dict[int, torch.Tensor], layout: GuidanceLayout, calls_per_step: int,
                like: torch.Tensor) -> list[torch.Tensor]:
        """Every call's velocity on every rank (sum over the world; non-contributing ranks add zeros)."""
        if self.world_size == 1:
            return [velocities[i] for i in range(calls_per_step)]
        stacked = like.new_zeros((calls_per_step, *like.shape), dtype=torch.float32)
        if layout.contributes:
            for i, v in velocities.items():
                stacked[i] = v
        dist.all_reduce(stacked)
        return list(stacked.unbind(0))

    def smallest(self, value: int) -> int:
        """The smallest `value` over the world. For settings every rank must share although each rank plans its
        own memory (the guidance batch fixes how many all-to-alls a step makes: unequal batches would pair
        mismatched collectives)."""
        if self.world_size == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shutdown(self) -> None:
        """Destroy the process group (call once at the end)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        self._layouts.clear()


def init_parallel(backend: str | None = None, device: torch.device | str | None = None,
                  guidance_parallel: bool = True, timeout_s: float = 600.0) -> ParallelState:
    """Join the process world started by torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT env vars).

    backend: "nccl" on CUDA, "gloo" on CPU (default: from the device). device: default `cuda:LOCAL_RANK`
    when CUDA is available, else CPU. Without torchrun's env vars (a single process) returns a state of
    world size 1 without initialising torch.distributed.
    """
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return ParallelState(0, 1, device, guidance_parallel)
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return ParallelState(dist.get_rank(), dist.get_world_size(), device, guidance_parallel)


def guidance_layout(world_size: int, calls_per_step: int, guidance_parallel: bool = True,
                    num_heads: int | None = None) -> tuple[int, int]:
    """(number of guidance groups G, ranks per group P) for a world of W ranks and C calls per step.

    Preference: C groups when W is a multiple of C; else one group of W (pure sequence parallelism); else the
    most groups G < C dividing W — the first whose P divides `num_heads`. When none of these fits (e.g. W = 3
    with 2 calls and 40 heads), the layout that finishes a step soonest (fewest calls per group over ranks per
    group; ties: more groups, fewer all-to-alls) among those with G·P ≤ W and P dividing the heads: the
    W − G·P ranks left over sit the step out (a correct result rather than a refusal). Without guidance
    parallelism (one group of all W ranks demanded) a W that cannot split the heads is InputError("world_size").
    """
    if world_size < 1 or calls_per_step < 1:
        raise ValueError(f"world size {world_size} and guidance calls {calls_per_step} must be >= 1")
    candidates = []
    if guidance_parallel and world_size % calls_per_step == 0:
        candidates.append(calls_per_step)
    candidates.append(1)
    if guidance_parallel:
        candidates += [g for g in range(min(calls_per_step, world_size), 1, -1) if world_size % g == 0]
    for groups in candidates:
        size = world_size // groups
        if num_heads is None or size == 1 or num_heads % size == 0:
            return groups, size
    if guidance_parallel:
        return _partial_layout(world_size, calls_per_step, num_heads)
    raise InputError("world_size", (
        f"sequence parallelism splits attention heads over the ranks of a group, and no layout of {world_size} "
        f"ranks for {calls_per_step} guidance calls per step gives groups whose size divides the model's "
        f"{num_heads} heads; use a world size that does (e.g. {calls_per_step} or a divisor of {num_heads})"))


def _partial_layout(world_size: int, calls_per_step: int, num_heads: int) -> tuple[int, int]:
    """(G, P) using at most `world_size` ranks, P dividing `num_heads`: the shortest step (ceil(C/G)/P model
    calls' worth of time per rank), ties broken towards more groups. G = min(C, W), P = 1 always qualifies."""
    best = None
    for groups in range(1, min(calls_per_step, world_size) + 1):
        for size in range(1, world_size // groups + 1):
            if num_heads % size:
                continue
            cost = (-(-calls_per_step // groups) / size, -groups)
            if best is None or cost < best[0]:
                best = (cost, (groups, size))
    return best[1]


def _pad_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`x` zero-padded at the end of `dim` to `length`."""
    extra = length - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)
