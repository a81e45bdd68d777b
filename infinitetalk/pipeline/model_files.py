"""Which file is which component of a job: an explicit choice wins, else the file found by content in a
ComfyUI-style models folder (checkpoints/detect.py). Nothing is loaded here; `load_models` and the header-only
`plan_from_files` both start from `resolve_model_paths`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints.detect import ModelFiles, detect_component, find_models, pick
from ..errors import InputError
from .request import PRESETS

__all__ = ["ModelPaths", "resolve_model_paths"]


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
