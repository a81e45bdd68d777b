"""Canonical view of a checkpoint: key prefixes stripped, fp8 scales separated from weights.

Every loader starts from `canonical_view(ckpt)`: it sees the reference's unprefixed names whatever
wrapper the file uses (`model.diffusion_model.`, `diffusion_model.`, `model.`, none), and receives
the fp8 per-layer scales of both ComfyUI layouts (legacy `scale_weight` + `scaled_fp8` marker;
current `weight_scale` with `_quantization_metadata` / `comfy_quant`) as a separate mapping
layer-name -> scale, to hand to `load_module(..., scales=...)`.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .reader import Checkpoint, CheckpointError

__all__ = ["CanonicalView", "canonical_view", "KNOWN_PREFIXES"]

KNOWN_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.", "model.")
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_SUPPORTED_QUANT_FORMATS = {"float8_e4m3fn", "float8_e5m2"}


@dataclass
class CanonicalView(Mapping[str, torch.Tensor]):
    """Read-only mapping canonical name -> tensor over a Checkpoint, plus fp8 scales by layer name."""

    ckpt: Checkpoint
    names: dict[str, str]  # canonical -> stored key
    scale_keys: dict[str, str] = field(default_factory=dict)  # layer -> stored scale key
    prefix: str = ""

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.ckpt[self.names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, key: object) -> bool:
        return key in self.names

    def shape(self, key: str) -> torch.Size:
        return self.ckpt.shape(self.names[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.ckpt.dtype(self.names[key])

    @property
    def path(self):
        return self.ckpt.path

    @property
    def metadata(self) -> dict[str, str]:
        return self.ckpt.metadata

    def scales(self) -> dict[str, torch.Tensor]:
        """fp8 dequantisation scales, layer name -> float32 tensor (scalar or per-row)."""
        return {layer: self.ckpt[key].to(torch.float32) for layer, key in self.scale_keys.items()}


def _detect_prefix(keys: Sequence[str], anchors: Sequence[str]) -> str:
    for prefix in KNOWN_PREFIXES:
        if any(prefix + a in keys for a in anchors):
            return prefix
    return ""


def _check_quant_metadata(ckpt: Checkpoint) -> None:
    layers: dict[str, dict] = {}
    raw = ckpt.metadata.get("_quantization_metadata")
    if raw:
        try:
            layers.update(json.loads(raw).get("layers", {}))
        except (ValueError, AttributeError) as exc:
            raise CheckpointError(ckpt.path, f"unreadable _quantization_metadata: {exc}") from exc
    for key in ckpt:
        if key.endswith(".comfy_quant"):
            try:
                layers[key[: -len(".comfy_quant")]] = json.loads(bytes(ckpt[key].tolist()).decode())
            except (ValueError, UnicodeDecodeError) as exc:
                raise CheckpointError(ckpt.path, f"unreadable quantization entry {key!r}: {exc}") from exc
    for layer, spec in layers.items():
        fmt = (spec or {}).get("format")
        if fmt not in _SUPPORTED_QUANT_FORMATS:
            raise CheckpointError(
                ckpt.path, f"layer {layer!r} uses quantization format {fmt!r}; supported: {sorted(_SUPPORTED_QUANT_FORMATS)}")


def canonical_view(ckpt: Checkpoint, anchors: Sequence[str] = ()) -> CanonicalView:
    """Strip the wrapper prefix (found via `anchors`: canonical keys the component surely has, or any
    key when none given) and split off fp8 scale tensors and markers."""
    keys = list(ckpt.keys())
    key_set = set(keys)
    prefix = _detect_prefix(key_set, anchors) if anchors else ""
    if not prefix and not anchors:
        for p in KNOWN_PREFIXES:
            if keys and all(k.startswith(p) for k in keys):
                prefix = p
                break
    _check_quant_metadata(ckpt)
    names: dict[str, str] = {}
    scale_keys: dict[str, str] = {}
    for key in keys:
        if prefix and not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == "scaled_fp8" or name.endswith(_IGNORED_SUFFIXES) or name.endswith(".weight_scale_2"):
            continue
        scale_suffix = next((s for s in _SCALE_SUFFIXES if name.endswith(s)), None)
        if scale_suffix is not None:
            scale_keys[name[: -len(scale_suffix)]] = key
            continue
        names[name] = key
    return CanonicalView(ckpt=ckpt, names=names, scale_keys=scale_keys, prefix=prefix)
