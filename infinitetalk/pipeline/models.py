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

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints.detect import ModelFiles, detect_component, find_models, pick
from ..errors import InputError
from ..loaders.clip_vision import load_clip_vision
from ..loaders.dit import load_dit
from ..loaders.t5 import load_text_encoder
from ..loaders.vae import load_vae
from ..loaders.wav2vec2 import load_wav2vec2
from ..ops.options import RuntimeOptions
from ..runtime.budget import GiB, JobShape, Placement, auto_budget_bytes
from ..runtime.kernels import check_kernels, configure_dit
from ..runtime.plan import MemoryPlan, dit_weights_of, make_plan, module_bytes, plan_for_paths
from ..runtime.streaming import BlockStreamer
from .request import PRESETS
from .resolution import BUCKETS
from .sampler import Guidance

__all__ = ["ModelBundle", "ModelPaths", "load_models", "resolve_model_paths", "default_device", "default_dtype",
           "largest_bucket", "job_for", "plan_from_files"]

COMPONENTS = ("dit", "wav2vec2", "text_encoder", "clip_vision", "vae")
# Modules that visit the compute device only while used when offloading.
_VISITORS = ("text_encoder", "clip_vision")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators (the reference's run dtype), fp32 on the CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type != "cpu" else torch.float32


@dataclass
class ModelPaths:
    """The files of one job. `patch`: the InfiniteTalk audio adapter when it is a separate file."""

    dit: Path
    wav2vec2: Path
    text_encoder: Path
    clip_vision: Path
    vae: Path
    patch: Path | None = None
    loras: list[tuple[Path, float]] = field(default_factory=list)
    tokenizer: Path | None = None

    def identity(self) -> str:
        """Names + sizes + mtimes of every file (cheap; enough to tell whether a resume uses the same models)."""
        parts = []
        for name, p in sorted(vars(self).items()):
            items = p if isinstance(p, list) else [p]
            for item in items:
                path, strength = (item if isinstance(item, tuple) else (item, None))
                if path is None:
                    continue
                st = Path(path).stat()
                parts.append(f"{name}:{Path(path).name}:{st.st_size}:{int(st.st_mtime)}:{strength}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


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
    sampler: Callable[..., torch.Tensor] | None = None   # sample_window's stand-in in multi-process runs (runtime/launch.py)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    budget: int | None = None            # bytes the job may use on `device`; None = unlimited
    placement: Placement | None = None   # the current job's decision (max_guidance_batch, vae_tile, ...)
    plan: MemoryPlan | None = None
    _streamer: BlockStreamer | None = field(default=None, repr=False)
    _sizes: tuple | None = field(default=None, repr=False)   # (DiT weights, other components' bytes), measured once
    _evict_for: frozenset = field(default=frozenset(), repr=False)

    @property
    def vae_tile(self) -> tuple[int, int, int] | None:
        """The VAE decode tile the placement chose (None = whole frames)."""
        return None if self.placement is None else self.placement.vae_tile

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
        self._place(plan.placement)
        resident = dit[0].other_bytes + sum(b for i, b in enumerate(dit[0].block_bytes)
                                            if i not in plan.placement.streamed)
        self._evict_for = frozenset(name for name, peak in plan.visit_peaks.items()
                                    if self.budget is not None and peak + resident > self.budget)
        self.placement, self.plan = plan.placement, plan
        return plan

    def _place(self, placement: Placement) -> None:
        """Move DiT blocks so that exactly `placement.streamed` stream and the rest sit on the device."""
        want = tuple(placement.streamed)
        current = self._streamer.streamed if self._streamer is not None else ()
        if self.placement is not None and want == current:
            return
        if self._streamer is not None:
            self._streamer.remove(device="cpu")
            self._streamer = None
        if want:   # first off the device, then the rest onto it: never both sets at once
            self._streamer = BlockStreamer(self.dit.blocks, want, self.device, placement.prefetch).install()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for name, child in self.dit.named_children():
            if name != "blocks":
                child.to(self.device)
        for i, block in enumerate(self.dit.blocks):
            if i not in want:
                block.to(self.device)

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
        if self._streamer is not None:
            self._streamer.remove(device="cpu")
            self._streamer = None
        for module in self.modules().values():
            module.to("cpu")
        self.placement = None   # so the next prepare places the DiT again
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
        target = getattr(module, "model", module)   # TextEncoder wraps its T5
        visiting = self.offload and name in _VISITORS
        evict = visiting and name in self._evict_for and self.dit is not None
        if evict:   # the visit does not fit beside the DiT: its resident part waits on the host
            self.dit.to("cpu")
        if visiting:
            target.to(self.device)
        try:
            yield module
        finally:
            if visiting:
                target.to("cpu")
            if evict:
                self.dit.to(self.device)
            if visiting and self.device.type == "cuda":
                torch.cuda.empty_cache()


def _prefer_named(files: list[Path], words: tuple[str, ...]) -> list[Path]:
    """Candidates whose file name contains one of `words` first (content cannot tell these apart)."""
    named = [p for p in files if any(w in str(p).lower() for w in words)]
    return named or files


def resolve_model_paths(models_dir: str | Path | None, preset: str = "quality", overrides: dict | None = None
                        ) -> ModelPaths:
    """Pick each component's file: an explicit override wins, else the file found by content in `models_dir`
    (`checkpoints.detect.pick`: highest precision, then alphabetical).

    DiT: one file with the InfiniteTalk weights inside, else the Wan2.1-I2V base + the InfiniteTalk patch
    (a "multi" patch preferred). The `fast` preset needs a step-distill LoRA (`loras/`, a lightx2v / FusionX
    / distill name preferred); without one it is an InputError naming the file to download.
    """

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if models_dir is not None:
        root = Path(models_dir)
        if not root.is_dir():
            raise InputError("models", f"{root} is not a folder (expected a ComfyUI-style models folder)")
        found = find_models(root)
    else:
        found = ModelFiles(root=Path("."))

    def given(name: str) -> Path | None:
        if name not in overrides:
            return None
        p = Path(overrides[name])
        if not p.exists():
            raise InputError(name, f"file not found: {p}")
        return p

    def missing(what: str, flag: str, example: str) -> InputError:
        where = f"in {models_dir}" if models_dir is not None else "(no --models folder given)"
        return InputError("models", f"no {what} found {where}; put {example} there or pass --{flag} FILE")

    def one(component: str, name: str, flag: str, example: str) -> Path:
        p = given(name) or pick(found, component)
        if p is None:
            raise missing(component.replace("_", " "), flag, example)
        return p

    dit, patch = given("dit"), given("patch")
    if dit is None:
        combined = pick(found, "dit+infinitetalk")
        dit = combined or pick(found, "dit")
        if dit is None:
            raise missing("Wan2.1-I2V DiT", "dit", "diffusion_models/wan2.1_i2v_480p_14B_bf16.safetensors")
    if patch is None and detect_component(dit) == "dit":
        patches = _prefer_named(found.infinitetalk, ("multi",))
        if not patches:
            raise missing("InfiniteTalk audio adapter (the DiT file has no audio weights)", "patch",
                          "model_patches/Wan2_1-InfiniteTalk-Multi_fp16.safetensors")
        patch = pick(ModelFiles(root=found.root, infinitetalk=patches, precision=found.precision), "infinitetalk")

    strength = float(overrides.get("lora_strength", 1.0))
    loras = [(Path(p), float(s)) for p, s in overrides.get("loras", [])]
    if PRESETS[preset].needs_distill_lora and not loras:
        candidates = _prefer_named(found.lora, ("lightx2v", "distill", "fusionx", "lightning", "causvid"))
        if not candidates:
            raise InputError("preset", "the 'fast' preset needs a step-distill LoRA in loras/, e.g. "
                                       "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors "
                                       "(lightx2v) or the FusionX I2V LoRA; pass --lora FILE or use --preset quality")
        best = pick(ModelFiles(root=found.root, lora=candidates, precision=found.precision), "lora")
        loras = [(best, strength)]
    return ModelPaths(
        dit=dit, patch=patch, loras=loras, tokenizer=given("tokenizer"),
        wav2vec2=one("wav2vec2", "wav2vec2", "wav2vec2", "audio_encoders/chinese-wav2vec2-base (model.safetensors)"),
        text_encoder=one("t5", "text_encoder", "text-encoder", "text_encoders/umt5-xxl-enc-bf16.safetensors"),
        clip_vision=one("clip_vision", "clip_vision", "clip-vision", "clip_vision/clip_vision_h.safetensors"),
        vae=one("vae", "vae", "vae", "vae/wan_2.1_vae.safetensors"),
    )


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
                    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, batch_guidance: bool = True
                    ) -> MemoryPlan:
    """The plan of a job from file headers only (`python -m infinitetalk plan`): resolves the files and the
    job here, sizes them in `runtime.plan.plan_for_paths` (which never imports the pipeline)."""
    paths = resolve_model_paths(models_dir, preset, overrides)
    budget = None if not vram_gb else int(vram_gb * GiB)
    if budget is None and device == "cuda" and torch.cuda.is_available():
        budget = auto_budget_bytes(torch.cuda.mem_get_info()[0])
    return plan_for_paths(paths, job_for(preset, resolution, frame_num), budget, device=device, dtype=dtype,
                          batch_guidance=batch_guidance, label=f"preset {preset}, {resolution}, {frame_num} frames/window")
