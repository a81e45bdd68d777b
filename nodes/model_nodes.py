"""InfiniteTalkModelLoader: pick the files from ComfyUI's model folders; load them once, on first use."""
from __future__ import annotations

import importlib.util
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infinitetalk.checkpoints.detect import DIT_KINDS
from infinitetalk.errors import InputError
from infinitetalk.pipeline.model_files import dit_is_distilled
from infinitetalk.ops.options import ATTENTION_CHOICES, FP8_MATMUL_CHOICES, RuntimeOptions

from . import bridge

NONE = "none"
SHARD = re.compile(r"^(.*)-(\d{5})-of-\d{5}\.safetensors$")
MAX_GPUS = 16
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OFFLOADS = ("auto", "on", "off")

HF = "https://huggingface.co"
REPACK = f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
# input name -> where the file the templates name is downloaded from (also the templates' `properties.models`)
DOWNLOADS: dict[str, str] = {
    "diffusion_model": f"{REPACK}/diffusion_models/wan2.1_i2v_480p_14B_fp8_scaled.safetensors",
    "infinitetalk_patch": f"{REPACK}/model_patches/wan2.1_infiniteTalk_multi_fp16.safetensors",
    "lora": f"{HF}/Kijai/WanVideo_comfy/resolve/main/Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors",
    "audio_encoder": f"{HF}/Kijai/wav2vec2_safetensors/resolve/main/wav2vec2-chinese-base_fp16.safetensors",
    "text_encoder": f"{REPACK}/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "clip_vision": f"{REPACK}/clip_vision/clip_vision_h.safetensors",
    "vae": f"{REPACK}/vae/wan_2.1_vae.safetensors",
}

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
GGUF_ROLES = ("diffusion_model", "infinitetalk_patch")  # the roles whose loaders read .gguf
CONTENT_FILTERED = ("infinitetalk_patch",)  # dropdowns that list only files holding their component

_components: dict[tuple[str, int, int], str] = {}  # (path, mtime, size) -> component, for the dropdowns


def gguf_supported(role: str) -> bool:
    """.gguf files are offered only where they load: the DiT and the InfiniteTalk weights, once GGUF reading exists."""
    return role in GGUF_ROLES and importlib.util.find_spec("infinitetalk.checkpoints.gguf") is not None


def _component_of(path: Path) -> str:
    """detect_component, cached by file identity (the dropdown is rebuilt on every page load)."""
    from infinitetalk.checkpoints.detect import detect_component

    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _components:
        try:
            _components[key] = detect_component(path)
        except (ValueError, OSError):  # CheckpointError: unreadable files are not offered
            _components[key] = "unknown"
    return _components[key]


def _listed(role: str, folder: str, name: str) -> bool:
    """Whether a file of `folder` belongs in `role`'s dropdown (a sharded model shows as its first shard)."""
    if name.lower().endswith(".gguf") and not gguf_supported(role):
        return False
    shard = SHARD.match(Path(name).name)
    if shard and (role in CONTENT_FILTERED or shard.group(2) != "00001"):
        return False
    if role in CONTENT_FILTERED:
        path = bridge.model_path(folder, name)
        return path is not None and _component_of(path) in ROLES[role][1]
    return True


def choices(role: str) -> list[str]:
    """The dropdown of one loader input: its folders' weight files ('none' first for optional ones)."""
    folders = ROLES[role][0]
    names: list[str] = []
    for folder in folders:
        names += [n for n in bridge.list_models(folder) if n not in names and _listed(role, folder, n)]
    return ([NONE] if role in OPTIONAL_ROLES else []) + names


def _whole_checkpoint(path: Path) -> Path:
    """A shard of a sharded checkpoint (`x-00001-of-00003.safetensors`) stands for its index file."""
    match = SHARD.match(path.name)
    if match:
        index = path.with_name(f"{match.group(1)}.safetensors.index.json")
        if index.is_file():
            return index
    return path


def where_to_get(role: str) -> str:
    """What file `role` takes, the folder it goes in and where to download one."""
    folders, _, hint = ROLES[role]
    return f"put {hint} into models/{folders[0]} (download: {DOWNLOADS[role]}), then press R to refresh"


def missing_file_message(role: str, name: str) -> str:
    """The error for a chosen file that is in none of `role`'s folders."""
    return f"{name!r} is not in ComfyUI's models/{' or models/'.join(ROLES[role][0])} folder: {where_to_get(role)}"


def resolve(role: str, name: str) -> Path | None:
    """Full path of a combo choice (None for "none"); InputError naming the input when missing."""
    if role in OPTIONAL_ROLES and name in (NONE, "", None):
        return None
    for folder in ROLES[role][0]:
        path = bridge.model_path(folder, name)
        if path is not None:
            return _whole_checkpoint(path)
    raise InputError(role, missing_file_message(role, name))


def resolve_all(values: dict[str, str]) -> dict[str, Path | None]:
    """Every role's path; one InputError naming each missing file (not only the first) when any is absent."""
    paths, missing = {}, []
    for role, name in values.items():
        try:
            paths[role] = resolve(role, name)
        except InputError as err:
            missing.append(err)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        raise InputError(", ".join(e.input_name for e in missing), "; ".join(str(e) for e in missing))
    return paths


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
    distilled: bool = False  # the DiT is step-distilled (turbo's 4-step file): no distill LoRA needed
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    gpus: int = 1  # GPUs the sampler's job is spread over (multigpu/workers.py); 1 = this process only
    sampler: Any = field(default=None, repr=False)   # with gpus > 1: the WorkerPool `generate` samples with
    _bundle: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _entry: Any = field(default=None, repr=False)   # the bundle's entry in ComfyUI's memory manager

    def holds(self, bundle: Any) -> bool:
        return self._bundle is bundle

    def release(self, bundle: Any) -> None:
        """Let the bundle go (ComfyUI's memory manager needs the memory); the next `load` reads the files again."""
        if self._bundle is bundle:
            self._bundle = None

    def core_entry(self) -> Any:
        """The loaded bundle as an entry of ComfyUI's memory manager (nodes/core_memory.py); None before loading."""
        from .core_memory import CoreEntry

        if self._bundle is None:
            return None
        if self._entry is None or self._entry.bundle is not self._bundle:
            self._entry = CoreEntry(self, self._bundle)
        return self._entry

    def load(self, preset: str = "quality") -> Any:
        from infinitetalk.pipeline.models import load_models
        from infinitetalk.pipeline.request import PRESETS

        distilled_enough = self.has_lora or self.distilled
        if PRESETS.get(preset) is not None and PRESETS[preset].needs_distill_lora and not distilled_enough:
            turbo = " or the 4-step distilled DiT" if PRESETS[preset].distilled_dit else ""
            raise InputError("preset", f"the '{preset}' preset needs a step-distill LoRA{turbo}: choose one in the "
                                       "model loader's 'lora' (e.g. lightx2v I2V 480p rank64) or use preset 'quality'")
        with self._lock:
            if self._bundle is None:
                bridge.make_room_for(None)   # core cannot size files not yet loaded: its models make way
                extra: dict[str, Any] = {"runtime": self.runtime}
                names = ", ".join(Path(p).name for p in self._files())
                bridge.progress_text(f"Loading models (first run, may take minutes): {names}")
                start = time.monotonic()
                if self.gpus > 1:   # the DiT lives in `gpus` worker processes, started once (multigpu/workers.py)
                    from infinitetalk.multigpu.workers import FRONT_COMPONENTS, WorkerPool

                    pool = WorkerPool(self.gpus, dict(models_dir=None, preset=preset, dtype=self.dtype,
                                                      overrides=self.overrides, **extra),
                                      device_type=bridge.torch_device().type)
                    extra["components"] = FRONT_COMPONENTS
                self._bundle = load_models(None, preset=preset, device=bridge.torch_device(), dtype=self.dtype,
                                           overrides=self.overrides, offload=self.offload, **extra)
                if self.gpus > 1:
                    self.sampler = pool
                bridge.progress_text(f"Models loaded in {time.monotonic() - start:.0f} s; sampling...")
            return self._bundle

    def _files(self) -> list[Path]:
        files = [p for k, p in self.overrides.items() if k != "loras" and p is not None]
        return files + [p for p, _ in self.overrides.get("loras", [])]


class InfiniteTalkModelLoader:
    """Chooses the InfiniteTalk model files; formats (bf16, fp16, fp8, scaled fp8, Kijai or Comfy names) are read from the files."""

    DESCRIPTION = ("Picks every file an InfiniteTalk job needs from ComfyUI's model folders and checks each by its "
                   "content (a wrong file is reported here, naming the input). Weights are loaded on first use "
                   "by the sampler and kept while this node's output is cached.")
    CATEGORY = "InfiniteTalk"
    SEARCH_ALIASES = ["InfiniteTalk", "wan infinitetalk loader"]  # the node search also matches these
    FUNCTION = "load"
    RETURN_TYPES = ("INFINITETALK_MODELS",)
    RETURN_NAMES = ("models",)
    OUTPUT_TOOLTIPS = ("The model set for InfiniteTalk Multi Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        def combo(role: str, tooltip: str) -> tuple:  # `missing`: the web extension adds it to a missing-file error
            return (choices(role), {"tooltip": tooltip, "missing": where_to_get(role)})

        return {
            "required": {
                "diffusion_model": combo("diffusion_model", "Wan2.1 I2V 14B (480p) DiT from models/diffusion_models "
                                         "(fp8/fp16/bf16, Comfy-Org or Kijai files; may already contain InfiniteTalk)."),
                "infinitetalk_patch": combo("infinitetalk_patch", "InfiniteTalk MULTI audio adapter from "
                                            "models/model_patches (or diffusion_models); 'none' when the DiT file "
                                            "already contains it."),
                "lora": combo("lora", "Step-distill LoRA (lightx2v / FusionX) from models/loras, needed by the "
                              "'fast' preset and by 'turbo' on the base DiT; 'none' for 'quality' or the 4-step "
                              "distilled DiT."),
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
            "optional": {  # runtime settings: speed and memory (fp8_matmul on/auto trades a little exactness)
                "vram_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5, "advanced": True,
                                      "tooltip": "GPU memory the job may use in GB; 0 = automatic (free memory "
                                      "minus a margin). Lower it to stream DiT blocks from RAM on small GPUs."}),
                "attention": (list(ATTENTION_CHOICES), {"default": "auto", "advanced": True, "tooltip":
                              "Attention kernel: auto (default: the fastest exact one of the GPU, cuDNN on Hopper), "
                              "sdpa (PyTorch), cudnn, flash (flash-attn), fa3 (flash-attn 3), sage (sageattention, "
                              "lossy), math (plain reference maths, slow). flash/fa3/sage need their package."}),
                "fp8_matmul": (list(FP8_MATMUL_CHOICES), {"default": "off", "advanced": True, "tooltip":
                               "Multiply fp8 weights in fp8 (torch._scaled_mm; faster, slightly less exact): auto = where the GPU supports it "
                               "(Ada/Hopper+), on, or off (default: upcast to the compute precision, the faithful path)."}),
                "compile": ("BOOLEAN", {"default": False, "advanced": True, "tooltip":
                            "torch.compile the transformer blocks: slower first window, faster after."}),
                "gpus": ("INT", {"default": 1, "min": 1, "max": MAX_GPUS, "advanced": True, "tooltip":
                         "GPUs to spread each job over (sequence/guidance parallel); 1 = only ComfyUI's GPU."}),
                "dit_kind": (list(DIT_KINDS), {"default": "auto", "advanced": True, "tooltip":
                             "Whether the diffusion model is the 4-step distilled InfiniteTalk DiT (for the "
                             "'turbo' preset, no LoRA needed) or the base Wan2.1 DiT. auto: from the file's "
                             "metadata or name (4StepDistill); the tensors of both look alike."}),
            },
        }

    # No VALIDATE_INPUTS: ComfyUI then checks each file combo on its own, one error per missing file on its own
    # input (a VALIDATE_INPUTS over the combos has its one message attached to every one of them).
    def load(self, diffusion_model: str, infinitetalk_patch: str, lora: str, lora_strength: float,
             audio_encoder: str, text_encoder: str, clip_vision: str, vae: str, precision: str = "auto",
             offload: str = "auto", vram_gb: float = 0.0, attention: str = "auto", fp8_matmul: str = "off",
             compile: bool = False, gpus: int = 1, dit_kind: str = "auto") -> tuple:
        values = {"diffusion_model": diffusion_model, "infinitetalk_patch": infinitetalk_patch, "lora": lora,
                  "audio_encoder": audio_encoder, "text_encoder": text_encoder, "clip_vision": clip_vision, "vae": vae}
        paths = resolve_all(values)
        kinds = {role: check_component(role, p) for role, p in paths.items() if p is not None}
        if kinds["diffusion_model"] == "dit" and paths["infinitetalk_patch"] is None:
            raise InputError("infinitetalk_patch", "the chosen DiT has no InfiniteTalk weights; choose the "
                                                   "InfiniteTalk Multi file (e.g. wan2.1_infiniteTalk_multi_fp16)")
        if precision not in PRECISIONS:
            raise InputError("precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
        if offload not in OFFLOADS:
            raise InputError("offload", f"{offload!r} is not one of {', '.join(OFFLOADS)}")
        if not 1 <= int(gpus) <= MAX_GPUS:
            raise InputError("gpus", f"{gpus} is outside 1 .. {MAX_GPUS}")
        runtime = RuntimeOptions(vram_gb=float(vram_gb) or None, attention=attention, fp8_matmul=fp8_matmul,
                                 compile=bool(compile))
        overrides = {"dit": paths["diffusion_model"], "patch": paths["infinitetalk_patch"],
                     "wav2vec2": paths["audio_encoder"], "text_encoder": paths["text_encoder"],
                     "clip_vision": paths["clip_vision"], "vae": paths["vae"],
                     "loras": [(paths["lora"], float(lora_strength))] if paths["lora"] is not None else []}
        distilled = dit_is_distilled(paths["diffusion_model"], dit_kind)
        overrides["dit_kind"] = "distilled" if distilled else "base"
        choice = ModelChoice(overrides=overrides, dtype=None if precision == "auto" else precision,
                             offload=None if offload == "auto" else offload == "on",
                             has_lora=paths["lora"] is not None, runtime=runtime, gpus=int(gpus), distilled=distilled)
        return (choice,)
