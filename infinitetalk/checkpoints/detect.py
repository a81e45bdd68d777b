"""Which model a checkpoint file holds, from its tensor names and shapes only (never its file name).

Only headers are read (safetensors headers, index JSON, zip-pickle metadata via mmap), so scanning a
models tree with tens of GB of files takes milliseconds per file. `find_models` walks a ComfyUI-style
models folder and sorts every checkpoint by content; `pick` chooses one file per component by a
fixed, documented rule (see docs/model-files.md).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError
from .lora import is_lora_key
from .reader import Checkpoint, open_checkpoint

__all__ = ["COMPONENTS", "detect_component", "detect_checkpoint", "precision_of", "is_distilled_dit", "ModelFiles",
           "find_models", "pick", "DIT_KINDS"]

log = logging.getLogger(__name__)

COMPONENTS = ("dit", "dit+infinitetalk", "infinitetalk", "lora", "wav2vec2", "t5", "clip_vision", "vae")
MODEL_FOLDERS = ("diffusion_models", "unet", "model_patches", "loras", "audio_encoders", "wav2vec2",
                 "text_encoders", "clip", "clip_vision", "vae")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".gguf")
# A step-distilled DiT (LightX2V's `InfiniteTalk-4StepDistill-Mean-w-ITAudioAdaptorV6.1-{bf16,fp8}`, the
# `Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v` files) has exactly the base DiT's tensors: content
# cannot tell them apart, so the header metadata or the published file name does (docs/model-files.md).
DIT_KINDS = ("auto", "base", "distilled")
DISTILLED_NAME_WORDS = ("stepdistill", "4step")
_DIT_KIND_KEY = "infinitetalk.dit_kind"
_PRECISION_RANK = {"fp32": 5, "bf16": 4, "fp16": 3, "fp8_scaled": 2, "fp8": 1, "gguf": 1, "other": 0}


def _find(keys: list[str], suffix: str) -> str | None:
    """The key equal to `suffix` or ending in `.<suffix>` (any wrapper prefix), if any."""
    for k in keys:
        if k == suffix or k.endswith("." + suffix):
            return k
    return None


def _has(keys: list[str], *suffixes: str) -> bool:
    return all(_find(keys, s) is not None for s in suffixes)


def _audio_key(k: str) -> bool:
    return k.startswith("audio_proj.") or ".audio_proj." in k or ".audio_cross_attn." in k or ".norm_x." in k


def detect_checkpoint(ckpt: Checkpoint) -> str:
    """Component name of an opened checkpoint (see `detect_component`)."""
    keys = sorted(ckpt.keys())
    if not keys:
        return "unknown"
    if sum(is_lora_key(k) for k in keys) > len(keys) // 2:
        return "lora"
    patch = _find(keys, "patch_embedding.weight")
    is_dit = (patch is not None and len(ckpt.shape(patch)) == 5 and _has(keys, "head.head.weight")
              and any(".cross_attn.k_img." in k for k in keys))
    has_audio = _has(keys, "audio_proj.proj1.weight") and any(".audio_cross_attn." in k for k in keys)
    if is_dit:
        return "dit+infinitetalk" if has_audio else "dit"
    if has_audio and all(_audio_key(k) or k.endswith(("scaled_fp8", ".comfy_quant")) for k in keys):
        return "infinitetalk"
    if _has(keys, "visual.patch_embedding.weight") or _has(keys, "vision_model.embeddings.patch_embedding.weight"):
        return "clip_vision"
    if _has(keys, "feature_extractor.conv_layers.0.conv.weight", "encoder.layers.0.attention.q_proj.weight"):
        return "wav2vec2"
    if (_has(keys, "token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight")
            or _has(keys, "encoder.block.0.layer.0.SelfAttention.q.weight")):
        return "t5"
    dec = _find(keys, "decoder.conv1.weight")
    if dec is not None and _has(keys, "encoder.conv1.weight", "conv1.weight", "conv2.weight") and len(ckpt.shape(dec)) == 5:
        return "vae"
    return "unknown"


def detect_component(path: str | os.PathLike) -> str:
    """One of COMPONENTS or "unknown", decided from tensor names/shapes in the header only.

    `dit`: base Wan2.1 I2V DiT (no audio keys); `dit+infinitetalk`: base with the InfiniteTalk keys;
    `infinitetalk`: the audio patch only; `lora`; `wav2vec2` (HF names, maybe `wav2vec2.` prefix);
    `t5` (Wan or HF umT5 names); `clip_vision` (open-clip `visual.*`, or HF `vision_model.*`);
    `vae` (Wan VAE). Unreadable files raise CheckpointError naming the file.
    """
    return detect_checkpoint(open_checkpoint(path))


def precision_of(ckpt: Checkpoint) -> str:
    """Storage precision of the bulk of the weights: fp32, bf16, fp16, fp8_scaled, fp8, gguf or other."""
    if getattr(ckpt, "qtypes", None):  # GGUF-quantised (checkpoints.gguf)
        return "gguf"
    by_dtype: dict[torch.dtype, int] = {}
    scaled = False
    for k in ckpt:
        if k.endswith(("scale_weight", "weight_scale", "scaled_fp8", ".comfy_quant")):
            scaled = True
            continue
        if not ckpt.dtype(k).is_floating_point:  # embedded tokenizers, quantisation JSON, counters
            continue
        shape = ckpt.shape(k)
        n = 1
        for s in shape:
            n *= int(s)
        by_dtype[ckpt.dtype(k)] = by_dtype.get(ckpt.dtype(k), 0) + n
    if not by_dtype:
        return "other"
    main = max(by_dtype, key=lambda d: by_dtype[d])
    if main in (torch.float8_e4m3fn, torch.float8_e5m2):
        return "fp8_scaled" if scaled else "fp8"
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(main, "other")


def is_distilled_dit(ckpt: Checkpoint) -> bool:
    """Whether a DiT file is a step-distilled one: its metadata `infinitetalk.dit_kind` when present, else
    whether its file (or folder) name contains a LightX2V distill word (`4StepDistill`, `StepDistill`, `4step`)."""
    declared = ckpt.metadata.get(_DIT_KIND_KEY)
    if declared in ("base", "distilled"):
        return declared == "distilled"
    path = Path(ckpt.path)
    names = (path.name, path.parent.name) if path.name.endswith(".index.json") else (path.name,)   # shards: the folder
    return any(word in "".join(ch for ch in n.lower() if ch.isalnum()) for n in names for word in DISTILLED_NAME_WORDS)


@dataclass
class ModelFiles:
    """Checkpoints found under a models folder, by component (sorted paths)."""

    root: Path
    dit: list[Path] = field(default_factory=list)
    dit_infinitetalk: list[Path] = field(default_factory=list)
    infinitetalk: list[Path] = field(default_factory=list)
    lora: list[Path] = field(default_factory=list)
    wav2vec2: list[Path] = field(default_factory=list)
    t5: list[Path] = field(default_factory=list)
    clip_vision: list[Path] = field(default_factory=list)
    vae: list[Path] = field(default_factory=list)
    unknown: list[Path] = field(default_factory=list)
    errors: dict[Path, str] = field(default_factory=dict)  # unreadable files -> why
    precision: dict[Path, str] = field(default_factory=dict)
    distilled: set[Path] = field(default_factory=set)  # the step-distilled files of `dit` and `dit_infinitetalk`

    def of(self, component: str) -> list[Path]:
        """Candidates for a component name of COMPONENTS (e.g. "dit+infinitetalk")."""
        if component not in COMPONENTS:
            raise InputError("component", f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
        return getattr(self, component.replace("+", "_"))


def _candidates(root: Path) -> list[Path]:
    """Checkpoint entry points under root: files, or one index per sharded set (shards skipped)."""
    folders = [root / f for f in MODEL_FOLDERS if (root / f).is_dir()]
    files: set[Path] = set()
    for folder in folders or [root]:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            here = Path(dirpath)
            indexes = [f for f in filenames if f.endswith(".safetensors.index.json")]
            sharded: set[str] = set()
            for idx in indexes:
                files.add(here / idx)
                sharded.update(_shard_names(here / idx))
            for f in filenames:
                if f.endswith(CHECKPOINT_SUFFIXES) and f not in sharded:
                    files.add(here / f)
    if folders:  # files lying directly in the root count too
        files.update(p for p in root.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
    return sorted(files)


def _shard_names(index: Path) -> set[str]:
    import json

    try:
        return set(json.loads(index.read_text()).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError):
        return set()


def find_models(models_dir: str | os.PathLike) -> ModelFiles:
    """Scan a ComfyUI-style models tree (diffusion_models/, unet/, model_patches/, loras/, audio_encoders/,
    wav2vec2/, text_encoders/, clip/, clip_vision/, vae/, any depth; the root itself when none of these
    exist) and sort every checkpoint by content. Unreadable files are listed in `errors`, not raised."""
    root = Path(models_dir)
    if not root.is_dir():
        raise InputError("models", f"{root} is not a folder")
    found = ModelFiles(root=root)
    for path in _candidates(root):
        try:
            ckpt = open_checkpoint(path)
            component = detect_checkpoint(ckpt)
        except (CheckpointError, OSError) as exc:   # one bad file must not break jobs that do not need it
            found.errors[path] = str(exc)
            log.warning("skipping unreadable checkpoint %s", exc if isinstance(exc, CheckpointError) else f"{path}: {exc}")
            continue
        if component == "unknown":
            found.unknown.append(path)
            continue
        found.of(component).append(path)
        found.precision[path] = precision_of(ckpt)
        if component in ("dit", "dit+infinitetalk") and is_distilled_dit(ckpt):
            found.distilled.add(path)
    return found


def pick(files: ModelFiles, component: str, prefer: str | os.PathLike | None = None) -> Path | None:
    """Choose one file for `component`, deterministically.

    Rule: (1) when `prefer` is given, the candidate whose path, file name or stem equals it (or whose
    file name contains it, when exactly one does); no match is an InputError listing the candidates;
    (2) otherwise the highest storage precision (fp32 > bf16 > fp16 > fp8_scaled > fp8);
    (3) ties: alphabetical order of the path relative to the models folder, folder by folder. None when no candidate.
    """
    candidates = files.of(component)
    if not candidates:
        return None
    if prefer is not None and str(prefer) != "":
        want = str(prefer)
        exact = [p for p in candidates if want in (str(p), p.name, p.stem) or Path(want) == p]
        if not exact:
            exact = [p for p in candidates if want.lower() in p.name.lower()]
        if len(exact) == 1 or (exact and len({p.name for p in exact}) == 1):
            return sorted(exact)[0]
        names = ", ".join(p.name for p in candidates[:10])
        what = "matches several" if exact else "matches none"
        raise InputError(component, f"{want!r} {what} of the {component} files found ({names})")
    return sorted(candidates, key=lambda p: (-_PRECISION_RANK.get(files.precision.get(p, "other"), 0),
                                             p.relative_to(files.root).parts if p.is_relative_to(files.root) else p.parts))[0]
