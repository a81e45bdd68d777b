"""Every model a job needs, found by content in a ComfyUI-style models folder and loaded once.

Memory on CUDA: the DiT and the VAE stay on the GPU (used every window); the text encoder and CLIP live
on the CPU and visit the GPU only while they encode (`ModelBundle.using`), wav2vec2 runs on the CPU in
fp32 like the reference. On the CPU everything is simply resident.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError

__all__ = ["ModelBundle", "ModelPaths", "load_models", "resolve_model_paths", "default_device", "default_dtype"]

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
        if visiting:
            target.to(self.device)
        try:
            yield module
        finally:
            if visiting:
                target.to("cpu")
                if self.device.type == "cuda":
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
    from ..checkpoints.detect import ModelFiles, detect_component, find_models, pick
    from .request import PRESETS

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
                offload: bool | None = None) -> ModelBundle:
    """Find and load every component for `preset` on `device` (see module docstring for placement)."""
    from ..loaders import load_clip_vision, load_dit, load_text_encoder, load_vae, load_wav2vec2

    dev = torch.device(device) if device is not None else default_device()
    dt = _dtype(dtype) if dtype is not None else default_dtype(dev)
    off = (dev.type == "cuda") if offload is None else bool(offload)
    paths = resolve_model_paths(models_dir, preset, overrides)
    park = torch.device("cpu") if off else dev
    dit = load_dit(paths.dit, paths.patch, loras=tuple((str(p), s) for p, s in paths.loras), dtype=dt, device=dev)
    vae = load_vae(paths.vae, dtype=torch.float32, device=dev)
    wav2vec2 = load_wav2vec2(paths.wav2vec2, dtype=torch.float32, device="cpu")
    text = load_text_encoder(paths.text_encoder, paths.tokenizer, dtype=dt, device=park)
    clip = load_clip_vision(paths.clip_vision, dtype=dt, device=park)
    return ModelBundle(dit=dit, wav2vec2=wav2vec2, text_encoder=text, clip_vision=clip, vae=vae,
                       device=dev, dtype=dt, paths=paths, offload=off)


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if value not in names:
        raise InputError("dtype", f"{value!r} is not one of {', '.join(names)}")
    return names[value]
