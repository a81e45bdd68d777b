"""Block streaming: chosen DiT blocks keep their tensors in host memory and visit the device per call.

Installed from outside the model with forward pre/post hooks on `dit.blocks[i]`, so models/ stays a plain
nn.Module and any tensor a block owns moves with it: every parameter and every buffer (fp8 weights and
their scales, LoRA factors registered on the block, GGUF blocks, ...).

Memory is bounded by construction:
- host: one arena per streamed block (one byte buffer, the block's tensors are typed views into it at
  aligned offsets, `arena_layout`); on CUDA the arena is page-locked in place (`cudaHostRegister`, so no
  power-of-two rounding by the caching host allocator) and each block copy is a single memcpy;
- device: a ring of `min(prefetch + 1, streamed)` persistent buffers of the largest arena, allocated once at
  install. A block is attached by pointing its tensors at typed views of its ring buffer. Nothing is
  allocated per call, so the allocator's *reserved* memory cannot grow however far the host runs ahead.
- CUDA: copies run on a side stream; before a buffer is overwritten the side stream waits on the event
  recorded on the compute stream after the buffer's previous block ran ("free"), and the compute stream
  waits on the copy's event ("ready") before a block uses it.
- CPU: the same ring and copies without streams or events, so CI runs this code and compares it with the
  resident path (streamed == resident, byte for byte).
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BlockStreamer", "ArenaLayout", "arena_layout", "ARENA_ALIGN"]

ARENA_ALIGN = 256   # bytes: every view starts on a 256-byte boundary (any dtype view, coalesced device loads)


@dataclass(frozen=True)
class ArenaLayout:
    """Where each tensor of a block sits in its arena: byte offsets, and the arena's total bytes."""

    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    total: int

    @property
    def payload(self) -> int:
        """Bytes of the tensors themselves (what the padding is measured against)."""
        return sum(self.nbytes)


def arena_layout(nbytes: Sequence[int], align: int = ARENA_ALIGN) -> ArenaLayout:
    """Pack tensors of `nbytes` bytes one after another, each starting on an `align`-byte boundary."""
    offsets, at = [], 0
    for n in nbytes:
        offsets.append(at)
        at += -(-int(n) // align) * align
    return ArenaLayout(tuple(offsets), tuple(int(n) for n in nbytes), at)


class _Slot:
    """One tensor of a block: where it lives in the module tree, its shape/dtype and its host view."""

    __slots__ = ("module", "name", "is_param", "host", "offset")

    def __init__(self, module: nn.Module, name: str, is_param: bool, host: torch.Tensor, offset: int):
        self.module, self.name, self.is_param, self.host, self.offset = module, name, is_param, host, offset

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor

    def view_of(self, arena: torch.Tensor) -> torch.Tensor:
        """This tensor as a typed view of `arena` (a uint8 buffer laid out like the block's host arena)."""
        n = self.host.numel() * self.host.element_size()
        return arena[self.offset:self.offset + n].view(self.host.dtype).view(self.host.shape)


def _pinned_arena(nbytes: int, registered: list[torch.Tensor]) -> torch.Tensor:
    """A page-locked host buffer of exactly `nbytes` (plain memory registered with CUDA, kept in `registered`
    until `_unpin`); where the driver refuses, the caching host allocator's pinned memory (rounded up)."""
    arena = torch.empty(nbytes, dtype=torch.uint8)
    try:
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(arena.data_ptr(), nbytes, 0)) == 0:
            registered.append(arena)
            return arena
        clear = getattr(cudart, "cudaGetLastError", None)   # the failed call must not surface in a later check
        if clear is not None:
            clear()
    except (AttributeError, RuntimeError):   # no cudart bindings in this build
        pass
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _unpin(arenas: list[torch.Tensor]) -> None:
    for arena in arenas:
        torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())
    arenas.clear()


class BlockStreamer:
    """Streams `blocks[i]` for i in `streamed`; the other blocks are left untouched where they are.

    `install()` moves the streamed blocks' tensors into host arenas (their module tensors become empty
    placeholders between calls); `remove(device)` puts them back as ordinary tensors on `device`.
    """

    def __init__(self, blocks: Sequence[nn.Module], streamed: Sequence[int], device: torch.device | str,
                 prefetch: int = 1):
        self.blocks = blocks
        self.streamed = tuple(sorted(set(int(i) for i in streamed)))
        if any(not 0 <= i < len(blocks) for i in self.streamed):
            raise ValueError(f"streamed block indices {self.streamed} outside 0..{len(blocks) - 1}")
        self.device = torch.device(device)
        self.prefetch = max(0, int(prefetch))
        self.cuda = self.device.type == "cuda"
        self._slots: dict[int, list[_Slot]] = {}
        self._arenas: dict[int, tuple[torch.Tensor, int]] = {}   # i -> (host arena, bytes to copy)
        self._pinned: list[torch.Tensor] = []                    # arenas registered with CUDA
        self._unpin = None
        self._ring: list[torch.Tensor] = []
        self._holder: list[int | None] = []       # ring slot -> block whose copy it holds
        self._age: list[int] = []                 # ring slot -> `copies` when it was filled
        self._ready: list = []                    # ring slot -> event: its copy is done (CUDA)
        self._free: list = []                     # ring slot -> event: its previous block has run (CUDA)
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}   # (block, ring slot) -> typed views
        self._handles: list = []
        self._inference = False                   # the blocks' tensors are inference tensors
        self._side = torch.cuda.Stream(self.device) if self.cuda else None
        self.host_bytes = 0        # bytes of the streamed tensors
        self.arena_bytes = 0       # host bytes holding them (pinned on CUDA): <= host_bytes + padding
        self.copies = 0            # block copies made (tests and logs)
        self.allocations = 0       # device buffers ever allocated (the ring: once per install)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> "BlockStreamer":
        """Arenas, ring and views are made, and later filled, in the blocks' own mode: ordinary tensors for a
        model built outside `inference_mode`, even when installed or run inside it (a compiled block would
        otherwise see other dispatch keys on streamed blocks and recompile), inference tensors for a model
        built inside it."""
        first = next((p for i in self.streamed for p in self.blocks[i].parameters()), None)
        self._inference = first is not None and first.is_inference()
        with torch.inference_mode(self._inference):
            return self._install()

    def _install(self) -> "BlockStreamer":
        if self.cuda:   # arenas are unpinned on remove(), or when the streamer is collected
            self._unpin = weakref.finalize(self, _unpin, self._pinned)
        for i in self.streamed:
            self._install_block(i)
        size = max((n for _, n in self._arenas.values()), default=0)
        count = min(len(self.streamed), self.prefetch + 1)
        if count:
            ring = torch.empty(count, size, dtype=torch.uint8, device=self.device)
            self._ring = list(ring.unbind(0))
            self.allocations += 1
        self._holder, self._age = [None] * count, [0] * count
        if self.cuda:
            self._ready = [torch.cuda.Event() for _ in range(count)]
            self._free = [torch.cuda.Event() for _ in range(count)]
        # typed views of every block in every buffer, made once: a call only swaps which tensors a block holds
        self._views = {(i, k): [s.view_of(buf) for s in self._slots[i]]
                       for i in self.streamed for k, buf in enumerate(self._ring)}
        for i in self.streamed:
            self._handles.append(self.blocks[i].register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(self.blocks[i].register_forward_hook(self._make_post(i)))
        return self

    def _install_block(self, i: int) -> None:
        """Copy block `i`'s tensors into one host arena and leave placeholders in the module."""
        owned = []
        for module in self.blocks[i].modules():
            owned += [(module, n, True, p.data) for n, p in module._parameters.items() if p is not None]
            owned += [(module, n, False, b) for n, b in module._buffers.items() if b is not None]
        layout = arena_layout([t.numel() * t.element_size() for *_, t in owned])
        if self.cuda and layout.total:
            arena = _pinned_arena(layout.total, self._pinned)
        else:
            arena = torch.empty(layout.total, dtype=torch.uint8)
        slots = []
        for (module, name, is_param, tensor), offset in zip(owned, layout.offsets):
            slot = _Slot(module, name, is_param, tensor.detach(), offset)
            host = slot.view_of(arena)
            host.copy_(slot.host)          # straight into the arena, one tensor at a time
            slot.host = host
            slot.set(torch.empty(0, dtype=host.dtype, device=self.device))   # the original can be freed now
            slots.append(slot)
        self._slots[i] = slots
        self._arenas[i] = (arena, layout.total)
        self.host_bytes += layout.payload
        self.arena_bytes += layout.total

    def remove(self, device: torch.device | str | None = None) -> None:
        """Undo `install`: streamed blocks hold ordinary tensors on `device` (default: the compute device)."""
        target = torch.device(device) if device is not None else self.device
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for slots in self._slots.values():
            for slot in slots:
                slot.set(slot.host.to(target, copy=True))
        if self._unpin is not None:
            torch.cuda.current_stream(self.device).synchronize()
            self._unpin()
        self._slots.clear()
        self._arenas.clear()
        self._views.clear()
        self._ring, self._holder, self._age, self._ready, self._free = [], [], [], [], []
        self.host_bytes = self.arena_bytes = 0

    # ------------------------------------------------------------------ per call
    def _make_pre(self, i: int):
        def pre(module, args):
            self._attach(i)
            for j in self._upcoming(i):
                self._load(j, keep=i)
        return pre

    def _make_post(self, i: int):
        def post(module, args, output):
            self._release(i)
        return post

    def _upcoming(self, i: int) -> list[int]:
        """The next `prefetch` streamed blocks after `i`, wrapping to the next model call."""
        at = self.streamed.index(i)
        n = len(self.streamed)
        return [self.streamed[(at + k) % n] for k in range(1, min(self.prefetch, n - 1) + 1)]

    def _load(self, i: int, keep: int) -> int:
        """Copy block `i` into a ring buffer (side stream on CUDA) unless it is already in one; returns the
        buffer. The buffer taken is a free one, else the one whose block was loaded longest ago, never `keep`'s."""
        if i in self._holder:
            return self._holder.index(i)
        free = [k for k, b in enumerate(self._holder) if b is None]
        k = free[0] if free else min((k for k, b in enumerate(self._holder) if b != keep), key=self._age.__getitem__)
        evicted = self._holder[k]
        if evicted is not None:
            self._release(evicted)
        arena, n = self._arenas[i]
        with torch.inference_mode(self._inference):
            if self.cuda:
                with torch.cuda.stream(self._side):
                    self._side.wait_event(self._free[k])          # its previous block has finished reading it
                    self._ring[k][:n].copy_(arena[:n], non_blocking=True)
                    self._ready[k].record(self._side)
            else:
                self._ring[k][:n].copy_(arena[:n])
        self._holder[k] = i
        self.copies += 1
        self._age[k] = self.copies
        return k

    def _attach(self, i: int) -> None:
        k = self._load(i, keep=i)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._ready[k])
        for slot, view in zip(self._slots[i], self._views[(i, k)]):
            slot.set(view)

    def _release(self, i: int) -> None:
        """Block `i` is done with its buffer: placeholders in the module, the buffer free for the next copy."""
        if i in self._holder:
            k = self._holder.index(i)
            if self.cuda:
                self._free[k].record(torch.cuda.current_stream(self.device))
            self._holder[k] = None
        for slot in self._slots[i]:
            slot.set(torch.empty(0, dtype=slot.host.dtype, device=self.device))
