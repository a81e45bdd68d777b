"""Our loaded models as one entry of ComfyUI's memory manager (`comfy.model_management`), so either side can free
the other: before a job core makes room for ours (evicting only what it must, not all of its models), and when
a later workflow loads a core model (a Flux image model, another video model) and needs the memory, core
unloads ours the way it unloads its own.

`CoreEntry` answers the part of core's ModelPatcher interface that model_management calls (sizes, load,
partial / full unload, identity). Loading goes through our own placement (the DiT's blocks are placed and
streamed by `ModelBundle.prepare` at each job); unloading moves our weights to host memory, or, when the
device is the CPU itself, lets the whole bundle go (the next job loads it again).
"""
from __future__ import annotations

import uuid
from typing import Any

import torch


class CoreEntry:
    """A ModelPatcher look-alike for one loaded ModelBundle of a ModelChoice."""

    def __init__(self, owner: Any, bundle: Any):
        self.owner, self.bundle = owner, bundle   # owner: the ModelChoice that holds (and reloads) the bundle
        self.load_device = bundle.device
        self.offload_device = torch.device("cpu")
        self.parent = None
        self.clone_base_uuid = uuid.uuid4()
        modules = bundle.modules()
        self.model = modules.get("dit") or next(iter(modules.values()))   # what core keeps a weak reference to
        self.size = sum(t.numel() * t.element_size() for m in modules.values() for t in [*m.parameters(), *m.buffers()])

    # -- sizes -------------------------------------------------------------------------------------
    def model_size(self) -> int:
        return self.size

    def loaded_size(self) -> int:
        return self.bundle.device_bytes() if self.owner.holds(self.bundle) else 0

    def loaded_ram_size(self) -> int:
        return self.size - self.loaded_size()

    def current_loaded_device(self) -> torch.device:
        return self.load_device

    def model_dtype(self) -> torch.dtype:
        return self.bundle.dtype

    # -- load / unload -------------------------------------------------------------------------------
    def partially_load(self, device: Any, extra_memory: float = 0, force_patch_weights: bool = False) -> int:
        """Core lets us use the device: the modules that live there come back; the DiT is placed per job."""
        before = self.loaded_size()
        if self.owner.holds(self.bundle):
            self.bundle.restore_device()
        return self.loaded_size() - before

    def partially_unload(self, device: Any, memory_to_free: float = 0, force_patch_weights: bool = False) -> int:
        return self._free()

    def detach(self, unpatch_all: bool = True) -> None:
        self._free()

    def _free(self) -> int:
        """Core needs the memory: weights to host memory, or on a CPU device the bundle itself let go."""
        if not self.owner.holds(self.bundle):
            return 0
        if self.load_device.type == "cpu":
            self.owner.release(self.bundle)
            return self.size
        return self.bundle.release_device()

    # -- what core asks of every patcher ----------------------------------------------------------
    def model_patches_to(self, device_or_dtype: Any) -> None:
        return None

    def model_patches_models(self) -> list:
        return []

    def get_nested_additional_models(self) -> list:
        return []

    def lowvram_patch_counter(self) -> int:
        return 0

    def is_dynamic(self) -> bool:
        return False

    def is_clone(self, other: Any) -> bool:
        return other is self
