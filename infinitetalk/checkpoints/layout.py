"""Canonical view of a checkpoint: key prefixes stripped, fp8 scales separated from weights.

Every loader starts from `canonical_view(ckpt, anchors)`: it sees the reference's unprefixed names
whatever wrapper the file uses (`model.diffusion_model.`, `diffusion_model.`, `model.`, none), and
receives the fp8 per-layer scales as a separate mapping layer-name -> scale, to hand to
`load_module(..., scales=view.scales())`.

Quantised layouts understood (ComfyUI's two generations, see docs/model-files.md):
- legacy "scaled fp8": `<layer>.weight` in fp8, `<layer>.scale_weight`, a `scaled_fp8` marker whose dtype
  is the storage dtype (float32 marker = float8_e4m3fn), optional `<layer>.scale_input` (ignored);
  plain `*_fp8_e4m3fn` files have fp8 weights and no scales (scale 1);
- current "mixed precision": per-layer formats in the header metadata `_quantization_metadata` (JSON
  `{"layers": {"<layer>": {"format": ...}}}`) or in uint8 JSON tensors `<layer>.comfy_quant`, with
  `<layer>.weight_scale` (per tensor or per output row) and optional `input_scale` (ignored).
Only the float8 formats are supported; any other (nvfp4, mxfp8, int8, ...) is refused with an error
naming the layer and the format. fp8 weights stay fp8: `layers.Linear` dequantises at use.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .lazy import LazyTensors
from ..errors import CheckpointError
from .reader import Checkpoint

__all__ = ["CanonicalView", "canonical_view", "KNOWN_PREFIXES", "SCALE_SUFFIXES", "IGNORED_SUFFIXES",
           "SUPPORTED_QUANT_FORMATS"]

KNOWN_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.", "model.")
SUPPORTED_QUANT_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")          # fp8 scales: split off, kept as float32 buffers
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")   # quantisation metadata no loader keeps
# Parameters that only exist in formats we do not implement; their presence means "refuse".
_FOREIGN_QUANT_SUFFIXES = {
    ".weight_scale_2": "nvfp4 (two-level scales)",
    ".pre_quant_scale": "nvfp4/awq (pre-quantisation scale)",
    ".weight_s_rel": "asym_w4a8_int8",
}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass
class CanonicalView(LazyTensors):
    """Read-only mapping canonical name -> tensor over a Checkpoint, plus fp8 scales by layer name.

    `quant_formats` tells which layers the file declares quantised (layer -> format); `fp8_storage`
    is the legacy marker's dtype (None when the file has no marker).
    """

    ckpt: Checkpoint
    names: dict[str, str]  # canonical -> stored key
    scale_keys: dict[str, str] = field(default_factory=dict)  # layer -> stored scale key
    prefix: str = ""
    quant_formats: dict[str, str] = field(default_factory=dict)
    fp8_views: dict[str, torch.dtype] = field(default_factory=dict)  # fp8 weights stored as uint8 bytes
    fp8_storage: torch.dtype | None = None

    @property
    def _index(self) -> dict[str, str]:
        return self.names

    def _load(self, key: str, stored_key: str) -> torch.Tensor:
        t = self.ckpt[stored_key]
        view = self.fp8_views.get(key)
        return t.view(view) if view is not None else t

    def shape(self, key: str) -> torch.Size:
        return self.ckpt.shape(self.names[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.fp8_views.get(key) or self.ckpt.dtype(self.names[key])

    def packed_type(self, key: str) -> int | None:
        return self.ckpt.packed_type(self.names[key])

    def packed(self, key: str) -> torch.Tensor:
        return self.ckpt.packed(self.names[key])

    @property
    def path(self) -> Path:
        return self.ckpt.path

    @property
    def metadata(self) -> dict[str, str]:
        return self.ckpt.metadata

    def strip_prefix(self, prefix: str) -> CanonicalView:
        """The tensors under a further wrapper `prefix` (one `canonical_view` does not know), without it."""
        def under(d: dict) -> dict:
            return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}
        return dataclasses.replace(self, names=under(self.names), scale_keys=under(self.scale_keys),
                                   quant_formats=under(self.quant_formats), fp8_views=under(self.fp8_views),
                                   prefix=self.prefix + prefix)

    def scales(self) -> dict[str, torch.Tensor]:
        """fp8 dequantisation scales, layer name -> float32 tensor.

        A per-tensor scale comes back as a 0-d tensor; a per-output-row scale as `[out, 1, ...]`
        (broadcastable against the layer's weight). Block-wise scales are refused.
        """
        out: dict[str, torch.Tensor] = {}
        for layer, key in self.scale_keys.items():
            s = self.ckpt[key].to(torch.float32)
            weight_key = layer + ".weight"
            w_shape = self.shape(weight_key) if weight_key in self.names else None
            if s.numel() == 1:
                s = s.reshape(())
            elif w_shape is not None and len(w_shape) >= 1 and s.numel() == w_shape[0] and (
                    s.dim() == 1 or all(d == 1 for d in s.shape[1:])):
                s = s.reshape((w_shape[0],) + (1,) * (len(w_shape) - 1))
            else:
                raise CheckpointError(
                    self.path, f"layer {layer!r} has a scale of shape {tuple(s.shape)} for a weight of shape "
                    f"{tuple(w_shape) if w_shape is not None else '?'}: only per-tensor or per-row fp8 scales are supported")
            out[layer] = s
        return out


def _detect_prefix(keys: set[str], anchors: Sequence[str]) -> str | None:
    for prefix in KNOWN_PREFIXES + ("",):
        if any(prefix + a in keys for a in anchors):
            return prefix
    return None


def _common_prefix(keys: Sequence[str]) -> str:
    for p in KNOWN_PREFIXES:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def _declared_quant_layers(ckpt: Checkpoint) -> dict[str, dict]:
    """Per-layer quantisation specs from `_quantization_metadata` and `<layer>.comfy_quant` tensors."""
    layers: dict[str, dict] = {}
    raw = ckpt.metadata.get("_quantization_metadata")
    if raw:
        try:
            declared = json.loads(raw).get("layers", {})
            if not isinstance(declared, dict):
                raise ValueError("'layers' is not an object")
            layers.update(declared)
        except (ValueError, AttributeError) as exc:
            raise CheckpointError(ckpt.path, f"unreadable _quantization_metadata: {exc}") from exc
    for key in ckpt:
        if key.endswith(".comfy_quant"):
            try:
                layers[key[: -len(".comfy_quant")]] = json.loads(bytes(ckpt[key].to(torch.uint8).tolist()).decode())
            except (ValueError, UnicodeDecodeError, RuntimeError) as exc:
                raise CheckpointError(ckpt.path, f"unreadable quantization entry {key!r}: {exc}") from exc
    for layer, spec in layers.items():
        fmt = spec.get("format") if isinstance(spec, dict) else None
        if fmt not in SUPPORTED_QUANT_FORMATS:
            raise CheckpointError(
                ckpt.path, f"layer {layer!r} uses quantization format {fmt!r}, which is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_QUANT_FORMATS))}); use an fp8, fp16 or bf16 file instead")
    return layers


def _marker_dtype(ckpt: Checkpoint, prefix: str) -> torch.dtype | None:
    for key in (prefix + "scaled_fp8", "scaled_fp8"):
        if key in ckpt:
            dt = ckpt.dtype(key)
            return torch.float8_e4m3fn if dt == torch.float32 else dt
    return None


def canonical_view(ckpt: Checkpoint, anchors: Sequence[str] = ()) -> CanonicalView:
    """Strip the wrapper prefix and split off fp8 scale tensors and markers.

    `anchors` are canonical keys the component surely has: the prefix is the one under which an
    anchor is found. Without anchors (or when no anchor is found) a prefix shared by every key is
    stripped. Keys outside the chosen prefix are dropped (e.g. a VAE bundled in the same file).
    """
    keys = list(ckpt.keys())
    prefix = _detect_prefix(set(keys), anchors) if anchors else None
    if prefix is None:
        prefix = _common_prefix(keys)
    declared = _declared_quant_layers(ckpt)
    fp8_storage = _marker_dtype(ckpt, prefix)
    names: dict[str, str] = {}
    scale_keys: dict[str, str] = {}
    for key in keys:
        if prefix and not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == "scaled_fp8" or name.endswith(IGNORED_SUFFIXES):
            continue
        foreign = next((f for s, f in _FOREIGN_QUANT_SUFFIXES.items() if name.endswith(s)), None)
        if foreign is not None:
            raise CheckpointError(ckpt.path, f"layer {name.rsplit('.', 1)[0]!r} is quantized in format {foreign}, "
                                  "which is not supported; use an fp8, fp16 or bf16 file instead")
        scale_suffix = next((s for s in SCALE_SUFFIXES if name.endswith(s)), None)
        if scale_suffix is not None:
            scale_keys[name[: -len(scale_suffix)]] = key
            continue
        names[name] = key
    quant_formats: dict[str, str] = {}
    for layer, spec in declared.items():
        canon = layer[len(prefix):] if prefix and layer.startswith(prefix) else layer
        quant_formats[canon] = spec["format"]
    fp8_views: dict[str, torch.dtype] = {}
    for layer in set(scale_keys) | set(quant_formats):
        wname = layer + ".weight"
        if wname not in names:
            continue
        stored = ckpt.dtype(names[wname])
        fmt = quant_formats.get(layer)
        want = SUPPORTED_QUANT_FORMATS[fmt] if fmt else (fp8_storage or torch.float8_e4m3fn)
        if stored in (torch.uint8, torch.int8) and fmt is not None:
            fp8_views[wname] = want  # ComfyUI also writes fp8 payloads as raw bytes
        elif stored not in _FP8 and not stored.is_floating_point:
            raise CheckpointError(ckpt.path, f"layer {layer!r} has a scale but its weight is stored as {stored} "
                                  "(an integer quantization format, not supported)")
    return CanonicalView(ckpt=ckpt, names=names, scale_keys=scale_keys, prefix=prefix,
                         quant_formats=quant_formats, fp8_views=fp8_views, fp8_storage=fp8_storage)
