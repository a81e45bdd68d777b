"""Every model a job needs, found by content in a ComfyUI-style models folder and loaded once.

Memory: a VRAM budget (`RuntimeOptions.vram_gb`; automatic on CUDA = free memory minus a margin) decides,
per job (`ModelBundle.prepare`), which DiT blocks stay on the device and which stream from host memory
(runtime/streaming.py), whether guidance calls may be batched, and how the VAE tiles its decode
(runtime/budget.py, docs/runtime.md). The VAE stays on the device; the text encoder and CLIP live on the CPU
and visit the device only while they encode (`ModelBundle.using`; the DiT steps aside to the host when the
visit would not fit beside it); wav2vec2 runs on the CPU in fp32 like the reference. Without a budget on the
CPU everything is simply resident; with one, the CPU honours it the same way (so CI runs the streaming path).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..loaders.clip_vision import load_clip_vision
from ..loaders.dit import load_dit
from ..loaders.t5 import load_text_encoder
from ..loaders.vae import load_vae
from ..loaders.wav2vec2 import load_wav2vec2
from ..ops.options import RuntimeOptions
from ..runtime.budget import GiB, JobShape, Placement, auto_budget_bytes
from ..runtime.kernels import check_kernels, configure_dit
from ..runtime.placement import BlockPlacement, visiting
from ..runtime.plan import MemoryPlan, dit_weights_of, make_plan, module_bytes, plan_for_paths
from ..runtime.streaming import BlockStreamer
from .model_files import ModelPaths, resolve_model_paths
from .request import PRESETS
from .resolution import BUCKETS
from .sampler import Guidance

__all__ = ["ModelBundle", "load_models", "default_device", "default_dtype", "largest_bucket", "job_for",
           "plan_from_files"]

COMPONENTS = ("dit", "wav2vec2", "text_encoder", "clip_vision", "vae")
# Modules that visit the compute device only while used when offloading.
_VISITORS = ("text_encoder", "clip_vision")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators (the reference's run dtype), fp32 on the CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type != "cpu" else torch.float32


@dataclass
class ModelBundle:
    dit: torch.nn.Module
    wav2vec2: torch.nn.Module
    text_encoder: object         # TextEncoder (model + tokenizer)
    clip_vision: torch.nn.Module
    vae: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    paths: ModelPaths | None = None
    offload: bool = False
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    budget: int | None = None            # bytes the job may use on `device`; None = unlimited
    placement: Placement | None = None   # the current job's decision (max_guidance_batch, vae_tile, ...)
    plan: MemoryPlan | None = None
    _blocks: BlockPlacement | None = field(default=None, repr=False)
    _sizes: tuple | None = field(default=None, repr=False)   # (DiT weights, other components' bytes), measured once

    @property
    def vae_tile(self) -> tuple[int, int, int] | None:
        """The VAE decode tile the placement chose (None = whole frames)."""
        return None if self.placement is None else self.placement.vae_tile

    @property
    def streamer(self) -> BlockStreamer | None:
        """The DiT's block streamer while some blocks stream, else None."""
        return None if self._blocks is None else self._blocks.streamer

    def prepare(self, job: JobShape) -> MemoryPlan:
        """Decide placement for `job` under the budget and apply it (stream or un-stream DiT blocks).

        Returns the plan; when `plan.fits` is False the placement streams everything and the caller
        should refuse the job (generate does, with InputError naming `vram`)."""
        if self.dit is None:
            raise InputError("models", "this bundle holds no DiT (a worker-pool front end cannot plan a job)")
        if self._sizes is None:
            others = {name: module_bytes(getattr(getattr(self, name), "model", getattr(self, name)))
                      for name in ("vae", "text_encoder", "clip_vision", "wav2vec2") if getattr(self, name) is not None}
            self._sizes = (dit_weights_of(self.dit), others)
        dit, others = self._sizes
        channels = self.vae.config.dim * self.vae.config.dim_mult[0] if self.vae is not None else 96
        plan = make_plan(dit, others, job, self.budget, device=str(self.device), act_bytes=self.dtype.itemsize,
                         label=f"run dtype {self.dtype}".replace("torch.", ""), vae_channels=channels,
                         batch_guidance=self.runtime.batch_guidance)
        if self._blocks is None:
            self._blocks = BlockPlacement(self.dit, self.device)
        self._blocks.apply(plan, dit[0], self.budget)
        self.placement, self.plan = plan.placement, plan
        return plan

    def recipe(self) -> dict:
        """What makes the sampling step-distilled, for the output's metadata: the DiT's kind and the LoRAs."""
        if self.paths is None:
            return {}
        return {"dit": Path(self.paths.dit).name, "dit_kind": "distilled" if self.paths.distilled else "base",
                "loras": [[Path(p).name, s] for p, s in self.paths.loras]}

    def modules(self) -> dict[str, torch.nn.Module]:
        """The loaded nn.Modules by component name (TextEncoder unwrapped to its T5)."""
        named = {name: getattr(self, name) for name in COMPONENTS}
        return {name: getattr(m, "model", m) for name, m in named.items() if m is not None}

    def device_bytes(self) -> int:
        """Bytes of weights now on the compute device (everything when that is the CPU)."""
        return sum(t.numel() * t.element_size() for m in self.modules().values()
                   for t in [*m.parameters(), *m.buffers()] if t.device.type == self.device.type)

    def release_device(self) -> int:
        """Move every weight to host memory (another program needs the device); the next `prepare` and
        `restore_device` bring them back. Returns the bytes freed on the device."""
        before = self.device_bytes() if self.device.type != "cpu" else 0
        if self._blocks is not None:   # so the next prepare places the DiT again
            self._blocks.release()
        for module in self.modules().values():
            module.to("cpu")
        self.placement = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return before

    def restore_device(self) -> None:
        """Undo `release_device` for the modules living on the device between uses (`prepare` places the DiT)."""
        homes = {"vae": self.device} | ({} if self.offload else {"text_encoder": self.device,
                                                                  "clip_vision": self.device})
        for name, module in self.modules().items():
            if name in homes:
                module.to(homes[name])

    def identity(self) -> str:
        base = self.paths.identity() if self.paths is not None else "in-memory"
        return f"{base}:{self.dtype}"

    @contextmanager
    def using(self, name: str) -> Iterator[torch.nn.Module]:
        """The named module, on the compute device while the block runs (and back on the CPU after, for
        the encoders that only visit when offloading)."""
        module = getattr(self, name)
        if not (self.offload and name in _VISITORS):
            yield module
            return
        evict = self._blocks is not None and name in self._blocks.evict_for and self.dit is not None
        target = getattr(module, "model", module)   # TextEncoder wraps its T5
        with visiting(target, self.device, evict=self.dit if evict else None):
            yield module


def load_models(models_dir: str | Path | None = None, preset: str = "quality", device: str | torch.device | None = None,
                dtype: torch.dtype | str | None = None, overrides: dict | None = None,
                offload: bool | None = None, components: tuple[str, ...] = COMPONENTS,
                runtime: RuntimeOptions | None = None) -> ModelBundle:
    """Find and load every component for `preset` on `device` (see module docstring for placement).

    `runtime`: budget and kernels (default RuntimeOptions()). With a budget on CUDA the DiT is read into host
    memory first and placed by `ModelBundle.prepare` (for a 480p window of the preset until a job says more).

    `components`: only these are loaded, the others are None (multi-process runs: ranks ≠ 0 hold only the DiT,
    the ComfyUI process with a worker pool everything but the DiT)."""
    dev = torch.device(device) if device is not None else default_device()
    dt = _dtype(dtype) if dtype is not None else default_dtype(dev)
    off = (dev.type == "cuda") if offload is None else bool(offload)
    paths = resolve_model_paths(models_dir, preset, overrides)
    park = torch.device("cpu") if off else dev
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise InputError("components", f"{sorted(unknown)} are not among {', '.join(COMPONENTS)}")
    wanted = set(components)
    runtime = runtime if runtime is not None else RuntimeOptions()
    if "dit" in wanted:   # a missing attention package or unusable fp8 mode fails before any weights are read
        check_kernels(runtime, dev)
    budget = _budget_bytes(runtime, dev)
    dit_home = dev if budget is None else torch.device("cpu")   # placed block by block below
    dit = (load_dit(paths.dit, paths.patch, loras=tuple((str(p), s) for p, s in paths.loras), dtype=dt,
                    device=dit_home) if "dit" in wanted else None)
    if dit is not None:
        configure_dit(dit, runtime, dev)
    vae = load_vae(paths.vae, dtype=torch.float32, device=dev) if "vae" in wanted else None
    wav2vec2 = load_wav2vec2(paths.wav2vec2, dtype=torch.float32, device="cpu") if "wav2vec2" in wanted else None
    text = (load_text_encoder(paths.text_encoder, paths.tokenizer, dtype=dt, device=park)
            if "text_encoder" in wanted else None)
    clip = load_clip_vision(paths.clip_vision, dtype=dt, device=park) if "clip_vision" in wanted else None
    bundle = ModelBundle(dit=dit, wav2vec2=wav2vec2, text_encoder=text, clip_vision=clip, vae=vae,
                         device=dev, dtype=dt, paths=paths, offload=off, runtime=runtime, budget=budget)
    if dit is not None:
        bundle.prepare(job_for(preset))
    return bundle


def _budget_bytes(runtime: RuntimeOptions, device: torch.device) -> int | None:
    """The explicit budget, else on CUDA the free memory minus the margin (measured before loading), else None."""
    if runtime.budget_bytes is not None:
        return runtime.budget_bytes
    if device.type == "cuda":
        return auto_budget_bytes(torch.cuda.mem_get_info(device)[0])
    return None


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if value not in names:
        raise InputError("dtype", f"{value!r} is not one of {', '.join(names)}")
    return names[value]


def largest_bucket(resolution: str) -> tuple[int, int]:
    """The bucket with the most DiT tokens at `resolution` (the worst case when the picture is not known)."""
    if resolution not in BUCKETS:
        raise InputError("resolution", f"expected one of {', '.join(BUCKETS)}, got {resolution!r}")
    return max(BUCKETS[resolution].values(), key=lambda hw: (hw[0] // 16) * (hw[1] // 16))


def job_for(preset: str, resolution: str = "480p", frame_num: int = 81, size: tuple[int, int] | None = None,
            calls_per_step: int | None = None) -> JobShape:
    """The JobShape of a request: its frame size (or the resolution's largest bucket) and the preset's calls."""
    if calls_per_step is None:
        p = PRESETS[preset]
        calls_per_step = Guidance(p.text_guidance, p.audio_guidance).calls_per_step
    h, w = size if size is not None else largest_bucket(resolution)
    return JobShape.for_window(h, w, frame_num, calls_per_step)


def plan_from_files(models_dir: str | Path | None, preset: str = "fast", resolution: str = "480p",
                    vram_gb: float | None = None, overrides: dict | None = None, frame_num: int = 81,
                    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, batch_guidance: bool = True,
                    fp8_matmul: bool = False) -> MemoryPlan:
    """The plan of a job from file headers only (`python -m infinitetalk plan`): resolves the files and the
    job here, sizes them in `runtime.plan.plan_for_paths` (which never imports the pipeline)."""
    paths = resolve_model_paths(models_dir, preset, overrides)
    budget = None if not vram_gb else int(vram_gb * GiB)
    if budget is None and device == "cuda" and torch.cuda.is_available():
        budget = auto_budget_bytes(torch.cuda.mem_get_info()[0])
    dit = "step-distilled DiT" if paths.distilled else "base DiT" + (" + LoRA" if paths.loras else "")
    return plan_for_paths(paths, job_for(preset, resolution, frame_num), budget, device=device, dtype=dtype,
                          batch_guidance=batch_guidance, fp8_matmul=fp8_matmul,
                          label=f"preset {preset} ({dit}), {resolution}, {frame_num} frames/window")
