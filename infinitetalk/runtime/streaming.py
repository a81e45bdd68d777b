"""Block streaming: chosen DiT blocks keep their tensors in host memory and visit the device per call.

Installed from outside the model with forward pre/post hooks on `dit.blocks[i]`, so models/ stays a plain
nn.Module and any tensor a block owns moves with it: every parameter and every buffer (fp8 weights and
their scales, LoRA factors registered on the block, ...).

- CUDA: host copies in pinned memory; the copy of the next `prefetch` streamed blocks is issued on a side
  stream while the current block computes; the compute stream waits on an event before using a block,
  and the block's device tensors are freed (record_stream) right after its forward.
- CPU: the same code without streams: each call copies the block's host tensors into fresh working
  tensors and drops them after, so CI runs the streaming path and can compare it with the resident one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BlockStreamer"]


class _Slot:
    """One tensor of a block: where it lives in the module tree and its host copy."""

    __slots__ = ("module", "name", "is_param", "host")

    def __init__(self, module: nn.Module, name: str, is_param: bool, host: torch.Tensor):
        self.module, self.name, self.is_param, self.host = module, name, is_param, host

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor


class BlockStreamer:
    """Streams `blocks[i]` for i in `streamed`; the other blocks are left untouched where they are.

    `install()` moves the streamed blocks' tensors to host copies (their device tensors become empty
    placeholders); `remove(device)` puts them back as ordinary tensors on `device`.
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
        self._loaded: dict[int, tuple[list[torch.Tensor], object]] = {}   # i -> (device tensors, ready event)
        self._handles: list = []
        self._side = torch.cuda.Stream(self.device) if self.cuda else None
        self.host_bytes = 0
        self.copies = 0   # block copies made (tests and logs)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> "BlockStreamer":
        for i in self.streamed:
            block = self.blocks[i]
            slots = []
            for module in block.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None:
                        slots.append(_Slot(module, name, True, self._host_copy(p.data)))
                for name, b in list(module._buffers.items()):
                    if b is not None:
                        slots.append(_Slot(module, name, False, self._host_copy(b)))
            for slot in slots:
                slot.set(torch.empty(0, dtype=slot.host.dtype, device=self.device))
                self.host_bytes += slot.host.numel() * slot.host.element_size()
            self._slots[i] = slots
            self._handles.append(block.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(block.register_forward_hook(self._make_post(i)))
        return self

    def remove(self, device: torch.device | str | None = None) -> None:
        """Undo `install`: streamed blocks hold ordinary tensors on `device` (default: the compute device)."""
        target = torch.device(device) if device is not None else self.device
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._loaded.clear()
        for slots in self._slots.values():
            for slot in slots:
                slot.set(slot.host.to(target, copy=target.type != "cpu"))
        self._slots.clear()
        self.host_bytes = 0

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        if self.cuda and not t.is_pinned():
            t = t.pin_memory()
        return t

    # ------------------------------------------------------------------ per call
    def _make_pre(self, i: int):
        def pre(module, args):
            self._attach(i)
            for j in self._upcoming(i):
                self._load(j)
        return pre

    def _make_post(self, i: int):
        def post(module, args, output):
            self._release(i)
        return post

    def _upcoming(self, i: int) -> list[int]:
        """The next `prefetch` streamed blocks after `i`, wrapping to the next model call."""
        if not self.prefetch or not self.cuda:
            return []
        at = self.streamed.index(i)
        n = len(self.streamed)
        return [self.streamed[(at + k) % n] for k in range(1, min(self.prefetch, n - 1) + 1)]

    def _load(self, i: int) -> None:
        """Start copying block `i` to the device (side stream on CUDA), unless already there or under way."""
        if i in self._loaded:
            return
        slots = self._slots[i]
        if self.cuda:
            with torch.cuda.stream(self._side):
                tensors = [s.host.to(self.device, non_blocking=True) for s in slots]
                event = torch.cuda.Event()
                event.record(self._side)
        else:
            tensors, event = [s.host.to(self.device, copy=True) for s in slots], None
        self._loaded[i] = (tensors, event)
        self.copies += 1

    def _attach(self, i: int) -> None:
        self._load(i)
        tensors, event = self._loaded[i]
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in tensors:
                t.record_stream(compute)   # freed after its last use on the compute stream, not before
        for slot, t in zip(self._slots[i], tensors):
            slot.set(t)

    def _release(self, i: int) -> None:
        self._loaded.pop(i, None)
        for slot in self._slots[i]:
            slot.set(torch.empty(0, dtype=slot.host.dtype, device=self.device))
