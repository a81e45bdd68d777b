"""Which file is which component of a job: an explicit choice wins, else the file found by content in a
ComfyUI-style models folder (checkpoints/detect.py). Nothing is loaded here; `load_models` and the header-only
`plan_from_files` both start from `resolve_model_paths`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints.detect import DIT_KINDS, ModelFiles, detect_component, find_models, is_distilled_dit, pick
from ..checkpoints.reader import open_checkpoint
from ..errors import InputError
from .request import PRESETS

__all__ = ["ModelPaths", "resolve_model_paths", "dit_is_distilled"]


@dataclass
class ModelPaths:
    """The files of one job. `patch`: the InfiniteTalk audio adapter when it is a separate file; `distilled`:
    the DiT is a step-distilled one (LightX2V 4-step), so no distill LoRA stands in for it."""

    dit: Path
    wav2vec2: Path
    text_encoder: Path
    clip_vision: Path
    vae: Path
    patch: Path | None = None
    loras: list[tuple[Path, float]] = field(default_factory=list)
    tokenizer: Path | None = None
    distilled: bool = False

    def identity(self) -> str:
        """Names + sizes + mtimes of every file (cheap; enough to tell whether a resume uses the same models)."""
        parts = ["dit:distilled"] if self.distilled else []
        for name, p in sorted(vars(self).items()):
            if isinstance(p, bool):
                continue
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


def _checked_kind(kind: str) -> str:
    if kind not in DIT_KINDS:
        raise InputError("dit_kind", f"{kind!r} is not one of {', '.join(DIT_KINDS)}")
    return kind


def dit_is_distilled(path: str | Path, kind: str = "auto") -> bool:
    """Whether the DiT file at `path` is a step-distilled one: `kind` "distilled" / "base" says so (the user
    knows; the tensors look alike), "auto" asks the file's metadata and name (`checkpoints.detect`)."""
    return _checked_kind(kind) == "distilled" or (kind == "auto" and is_distilled_dit(open_checkpoint(path)))


def _pick_dit(found: ModelFiles, preset: str, kind: str) -> Path | None:
    """The DiT for `preset`: a step-distilled file first for a preset made for one (turbo) unless `kind` is
    "base"; never a distilled file for the other presets unless `kind` is "distilled". Within a kind, a file
    with the InfiniteTalk weights inside first, then `pick`'s rule."""
    want = PRESETS[preset].distilled_dit and kind != "base"
    order = [True, False] if want else [False] if kind != "distilled" else [True]
    for distilled in order:
        for component in ("dit+infinitetalk", "dit"):
            files = [p for p in found.of(component) if (p in found.distilled) == distilled]
            if files:
                return pick(ModelFiles(root=found.root, precision=found.precision,
                                       **{component.replace("+", "_"): files}), component)
    return None


def resolve_model_paths(models_dir: str | Path | None, preset: str = "quality", overrides: dict | None = None
                        ) -> ModelPaths:
    """Pick each component's file: an explicit override wins, else the file found by content in `models_dir`
    (`checkpoints.detect.pick`: highest precision, then alphabetical).

    DiT: one file with the InfiniteTalk weights inside, else the Wan2.1-I2V base + the InfiniteTalk patch
    (a "multi" patch preferred). A step-distilled DiT (recognised by metadata or file name; override
    `dit_kind` "base" / "distilled" says which a file is) serves the `turbo` preset and gets the InfiniteTalk
    multi patch over it when one is found (as LightX2V loads its adapter). The `fast` preset, and `turbo`
    without a distilled DiT, need a step-distill LoRA (`loras/`, a lightx2v / FusionX / distill name
    preferred); without one it is an InputError naming the file to download.
    """

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    kind = _checked_kind(overrides.get("dit_kind", "auto"))
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
        dit = _pick_dit(found, preset, kind)
        if dit is None:
            only = f" (the step-distilled {', '.join(sorted(p.name for p in found.distilled))} is for preset turbo)" \
                if found.distilled else ""
            raise missing(f"Wan2.1-I2V DiT{only}", "dit", "diffusion_models/wan2.1_i2v_480p_14B_bf16.safetensors")
        distilled = dit in found.distilled
    else:
        distilled = dit_is_distilled(dit, kind)
    if patch is None and (distilled or detect_component(dit) == "dit"):
        patches = _prefer_named(found.infinitetalk, ("multi",))
        if patches:
            patch = pick(ModelFiles(root=found.root, infinitetalk=patches, precision=found.precision), "infinitetalk")
        elif detect_component(dit) == "dit":
            raise missing("InfiniteTalk audio adapter (the DiT file has no audio weights)", "patch",
                          "model_patches/Wan2_1-InfiniteTalk-Multi_fp16.safetensors")

    strength = float(overrides.get("lora_strength", 1.0))
    loras = [(Path(p), float(s)) for p, s in overrides.get("loras", [])]
    if PRESETS[preset].needs_distill_lora and not loras and not distilled:
        candidates = _prefer_named(found.lora, ("lightx2v", "distill", "fusionx", "lightning", "causvid"))
        if PRESETS[preset].distilled_dit:   # turbo stands in for the distilled DiT with lightx2v's own LoRA
            candidates = _prefer_named(candidates, ("lightx2v",))
        if not candidates:
            turbo = (" or the 4-step distilled DiT InfiniteTalk-4StepDistill-Mean-w-ITAudioAdaptorV6.1-bf16 in "
                     "diffusion_models/" if PRESETS[preset].distilled_dit else "")
            raise InputError("preset", f"the '{preset}' preset needs a step-distill LoRA in loras/, e.g. "
                                       "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors "
                                       f"(lightx2v) or the FusionX I2V LoRA{turbo}; pass --lora FILE or use "
                                       "--preset quality")
        best = pick(ModelFiles(root=found.root, lora=candidates, precision=found.precision), "lora")
        loras = [(best, strength)]
    return ModelPaths(
        dit=dit, patch=patch, loras=loras, tokenizer=given("tokenizer"), distilled=distilled,
        wav2vec2=one("wav2vec2", "wav2vec2", "wav2vec2", "audio_encoders/chinese-wav2vec2-base (model.safetensors)"),
        text_encoder=one("t5", "text_encoder", "text-encoder", "text_encoders/umt5-xxl-enc-bf16.safetensors"),
        clip_vision=one("clip_vision", "clip_vision", "clip-vision", "clip_vision/clip_vision_h.safetensors"),
        vae=one("vae", "vae", "vae", "vae/wan_2.1_vae.safetensors"),
    )
