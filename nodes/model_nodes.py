"""InfiniteTalkModelLoader: pick the files from ComfyUI's model folders; load them once, on first use."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infinitetalk.errors import InputError

from . import bridge

NONE = "none"
SHARD = re.compile(r"^(.*)-\d{5}-of-\d{5}\.safetensors$")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OFFLOADS = ("auto", "on", "off")

# input name -> (folders searched in order, components accepted, what to download when wrong)
ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "diffusion_model": (("diffusion_models",), ("dit", "dit+infinitetalk"),
                        "the Wan2.1 I2V 14B DiT, e.g. wan2.1_i2v_480p_14B_fp8_scaled.safetensors"),
    "infinitetalk_patch": (("model_patches", "diffusion_models"), ("infinitetalk",),
                           "the InfiniteTalk Multi weights, e.g. wan2.1_infiniteTalk_multi_fp16.safetensors"),
    "lora": (("loras",), ("lora",), "a step-distill LoRA, e.g. lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16"),
    "audio_encoder": (("audio_encoders", "wav2vec2"), ("wav2vec2",),
                      "chinese-wav2vec2-base, e.g. wav2vec2-chinese-base_fp16.safetensors"),
    "text_encoder": (("text_encoders",), ("t5",), "umT5-XXL, e.g. umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "clip_vision": (("clip_vision",), ("clip_vision",), "CLIP ViT-H, e.g. clip_vision_h.safetensors"),
    "vae": (("vae",), ("vae",), "the Wan2.1 VAE, e.g. wan_2.1_vae.safetensors"),
}
OPTIONAL_ROLES = ("infinitetalk_patch", "lora")


def choices(role: str) -> list[str]:
    folders = ROLES[role][0]
    names: list[str] = []
    for folder in folders:
        names += [n for n in bridge.list_models(folder) if n not in names]
    return ([NONE] if role in OPTIONAL_ROLES else []) + names


def _whole_checkpoint(path: Path) -> Path:
    """A shard of a sharded checkpoint (`x-00001-of-00003.safetensors`) stands for its index file."""
    match = SHARD.match(path.name)
    if match:
        index = path.with_name(f"{match.group(1)}.safetensors.index.json")
        if index.is_file():
            return index
    return path


def resolve(role: str, name: str) -> Path | None:
    """Full path of a combo choice (None for "none"); InputError naming the input when missing."""
    if role in OPTIONAL_ROLES and name in (NONE, "", None):
        return None
    for folder in ROLES[role][0]:
        path = bridge.model_path(folder, name)
        if path is not None:
            return _whole_checkpoint(path)
    raise InputError(role, f"{name!r} is not in ComfyUI's models/{' or models/'.join(ROLES[role][0])} folder")


def check_component(role: str, path: Path) -> str:
    """The component held by `path`, read from its tensors; InputError naming the input when it is the wrong one."""
    from infinitetalk.checkpoints.detect import detect_component

    try:
        found = detect_component(path)
    except ValueError as err:  # CheckpointError
        raise InputError(role, f"cannot read {path.name}: {err}") from err
    folders, accepted, hint = ROLES[role]
    if found not in accepted:
        what = "an unrecognised checkpoint" if found == "unknown" else f"a {found} checkpoint"
        raise InputError(role, f"{path.name} holds {what}; expected {hint}")
    return found


@dataclass
class ModelChoice:
    """INFINITETALK_MODELS: the chosen files and options; `load()` builds the ModelBundle once and keeps it."""

    overrides: dict
    dtype: str | None
    offload: bool | None
    has_lora: bool
    _bundle: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self, preset: str = "quality") -> Any:
        from infinitetalk.pipeline.models import load_models
        from infinitetalk.pipeline.request import PRESETS

        if PRESETS.get(preset) is not None and PRESETS[preset].needs_distill_lora and not self.has_lora:
            raise InputError("preset", f"the '{preset}' preset needs a step-distill LoRA: choose one in the model "
                                       "loader's 'lora' (e.g. lightx2v I2V 480p rank64) or use preset 'quality'")
        with self._lock:
            if self._bundle is None:
                self._bundle = load_models(None, preset=preset, device=bridge.torch_device(), dtype=self.dtype,
                                           overrides=self.overrides, offload=self.offload)
            return self._bundle


class InfiniteTalkModelLoader:
    """Chooses the InfiniteTalk model files; formats (bf16, fp16, fp8, scaled fp8, Kijai or Comfy names) are read from the files."""

    DESCRIPTION = ("Picks every file an InfiniteTalk job needs from ComfyUI's model folders and checks each by its "
                   "content (a wrong file is reported here, naming the input). Weights are loaded on first use "
                   "by the sampler and kept while this node's output is cached.")
    CATEGORY = "InfiniteTalk"
    FUNCTION = "load"
    RETURN_TYPES = ("INFINITETALK_MODELS",)
    RETURN_NAMES = ("models",)
    OUTPUT_TOOLTIPS = ("The model set for InfiniteTalk Multi Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        def combo(role: str, tooltip: str) -> tuple:
            return (choices(role), {"tooltip": tooltip})

        return {
            "required": {
                "diffusion_model": combo("diffusion_model", "Wan2.1 I2V 14B (480p) DiT from models/diffusion_models "
                                         "(fp8/fp16/bf16, Comfy-Org or Kijai files; may already contain InfiniteTalk)."),
                "infinitetalk_patch": combo("infinitetalk_patch", "InfiniteTalk MULTI audio adapter from "
                                            "models/model_patches (or diffusion_models); 'none' when the DiT file "
                                            "already contains it."),
                "lora": combo("lora", "Step-distill LoRA (lightx2v / FusionX) from models/loras, needed by the "
                              "'fast' preset; 'none' for the 'quality' preset."),
                "lora_strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                            "tooltip": "LoRA strength (1.0 for lightx2v)."}),
                "audio_encoder": combo("audio_encoder", "chinese-wav2vec2-base from models/audio_encoders or "
                                       "models/wav2vec2 (runs on the CPU in fp32)."),
                "text_encoder": combo("text_encoder", "umT5-XXL text encoder from models/text_encoders."),
                "clip_vision": combo("clip_vision", "CLIP ViT-H vision encoder from models/clip_vision."),
                "vae": combo("vae", "Wan2.1 VAE from models/vae (always computed in fp32)."),
                "precision": (list(PRECISIONS), {"default": "auto", "tooltip":
                              "Compute precision of the DiT and encoders: auto = bf16 on GPU, fp32 on CPU. fp8 "
                              "files stay fp8 in memory and compute in this precision."}),
                "offload": (list(OFFLOADS), {"default": "auto", "tooltip":
                            "Keep the text and CLIP encoders in CPU RAM and move them to the GPU only while they "
                            "encode (auto = on with a GPU). Saves ~7 GB of VRAM."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, diffusion_model: str, infinitetalk_patch: str, lora: str, audio_encoder: str,
                        text_encoder: str, clip_vision: str, vae: str) -> bool | str:
        values = {"diffusion_model": diffusion_model, "infinitetalk_patch": infinitetalk_patch, "lora": lora,
                  "audio_encoder": audio_encoder, "text_encoder": text_encoder, "clip_vision": clip_vision, "vae": vae}
        for role, name in values.items():
            try:
                resolve(role, name)
            except InputError as err:
                return str(err)
        return True

    def load(self, diffusion_model: str, infinitetalk_patch: str, lora: str, lora_strength: float,
             audio_encoder: str, text_encoder: str, clip_vision: str, vae: str, precision: str = "auto",
             offload: str = "auto") -> tuple:
        values = {"diffusion_model": diffusion_model, "infinitetalk_patch": infinitetalk_patch, "lora": lora,
                  "audio_encoder": audio_encoder, "text_encoder": text_encoder, "clip_vision": clip_vision, "vae": vae}
        paths = {role: resolve(role, name) for role, name in values.items()}
        kinds = {role: check_component(role, p) for role, p in paths.items() if p is not None}
        if kinds["diffusion_model"] == "dit" and paths["infinitetalk_patch"] is None:
            raise InputError("infinitetalk_patch", "the chosen DiT has no InfiniteTalk weights; choose the "
                                                   "InfiniteTalk Multi file (e.g. wan2.1_infiniteTalk_multi_fp16)")
        if precision not in PRECISIONS:
            raise InputError("precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
        if offload not in OFFLOADS:
            raise InputError("offload", f"{offload!r} is not one of {', '.join(OFFLOADS)}")
        overrides = {"dit": paths["diffusion_model"], "patch": paths["infinitetalk_patch"],
                     "wav2vec2": paths["audio_encoder"], "text_encoder": paths["text_encoder"],
                     "clip_vision": paths["clip_vision"], "vae": paths["vae"],
                     "loras": [(paths["lora"], float(lora_strength))] if paths["lora"] is not None else []}
        choice = ModelChoice(overrides=overrides, dtype=None if precision == "auto" else precision,
                             offload=None if offload == "auto" else offload == "on",
                             has_lora=paths["lora"] is not None)
        return (choice,)
