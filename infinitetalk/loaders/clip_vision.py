"""CLIP image-encoder files -> `ClipVisionEncoder` (ViT-H/14 penultimate tokens).

Accepted files (layout recognised from the key names, never from the file name):
- Wan: `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`, the whole XLM-R CLIP; only `visual.*`
  is read (`textual.*`, `log_scale` ignored);
- ComfyUI: `clip_vision_h.safetensors`, HF `CLIPVisionModel` names (`vision_model.*`); q/k/v projections
  are concatenated into `to_qkv`;
- open_clip's own names (`visual.conv1`, `transformer.resblocks.N.attn.in_proj_weight`, ...).
The head count is not in any shape: explicit argument, else safetensors metadata / a scalar
`infinitetalk.num_heads` tensor (tiny files), else the standard count for the width (ViT-H: 16).
"""
from __future__ import annotations

import math
import os
import re

import torch

from ..checkpoints.layout import CanonicalView, canonical_view
from ..checkpoints.materialize import FP8_DTYPES, build_on_meta, load_module
from ..errors import CheckpointError
from ..checkpoints.reader import open_checkpoint
from ..models.clip_vision import ClipVisionConfig, ClipVisionEncoder
from ._tensor_map import TensorMap

__all__ = ["load_clip_vision", "clip_vision_tensors", "infer_clip_vision_config", "HEADS_BY_WIDTH"]

HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}  # ViT-B, -L, -H, -g, -bigG
_HEADS_KEY = "infinitetalk.num_heads"

_ANCHORS = {
    "wan": "transformer.0.attn.to_qkv.weight",
    "hf": "encoder.layers.0.self_attn.q_proj.weight",  # under `vision_model.`
    "open_clip": "transformer.resblocks.0.attn.in_proj_weight",
}
# per-block names: module suffix -> stored suffix, for the layouts that only rename
_BLOCK_NAMES = {
    "hf": {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
           "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"},
    "open_clip": {"norm1": "ln_1", "norm2": "ln_2", "attn.proj": "attn.out_proj", "mlp.0": "mlp.c_fc",
                  "mlp.2": "mlp.c_proj"},
}


def _find_layout(view: CanonicalView) -> tuple[str, str]:
    for layout, anchor in _ANCHORS.items():
        for name in view:
            if name.endswith(anchor) and (name == anchor or name[-len(anchor) - 1] == "."):
                prefix = name[: -len(anchor)]
                if layout != "hf" or prefix.endswith("vision_model."):
                    return layout, prefix
    raise CheckpointError(view.path, (
        "not a CLIP vision encoder: expected open-clip names (visual.transformer.N.attn.to_qkv.weight), "
        f"HF CLIPVisionModel names (vision_model.encoder.layers.N.*); found e.g. {', '.join(list(view)[:3])}"))


def _reader(view: CanonicalView, name: str, scales: dict[str, torch.Tensor]):
    """Getter for a stored tensor; fp8 is dequantised here (CLIP is small; qkv may be concatenated)."""
    layer = name[: -len(".weight")] if name.endswith(".weight") else None

    def get() -> torch.Tensor:
        t = view[name]
        if t.dtype in FP8_DTYPES:
            t = t.to(torch.float32)
            if layer in scales:
                t = t * scales[layer]
        return t
    return get


def clip_vision_tensors(view: CanonicalView) -> tuple[TensorMap, str]:
    """Module-named lazy tensors (visual tower only) and the layout found ('wan', 'hf', 'open_clip')."""
    layout, prefix = _find_layout(view)
    out = TensorMap()
    scales = view.scales()

    def add(target: str, stored: str, shape=None, fn=None) -> None:
        key = prefix + stored
        if key not in view:
            return
        get = _reader(view, key, scales)
        out.add(target, shape or view.shape(key), (lambda: fn(get())) if fn else get)

    def add_vector_as_token(target: str, stored: str) -> None:  # [n, dim] or [dim] -> [1, n, dim]
        key = prefix + stored
        if key in view:
            s = view.shape(key)
            add(target, stored, (1, *s) if len(s) == 2 else (1, 1, *s), lambda t: t.reshape(1, -1, t.shape[-1]))

    if layout == "wan":
        for name in view:
            if name.startswith(prefix):
                add(name[len(prefix):], name[len(prefix):])
        return out, layout
    stored_blocks = "encoder.layers" if layout == "hf" else "transformer.resblocks"
    if layout == "hf":
        add("patch_embedding.weight", "embeddings.patch_embedding.weight")
        add_vector_as_token("cls_embedding", "embeddings.class_embedding")
        add_vector_as_token("pos_embedding", "embeddings.position_embedding.weight")
        norm = "pre_layrnorm"
    else:
        add("patch_embedding.weight", "conv1.weight")
        add_vector_as_token("cls_embedding", "class_embedding")
        add_vector_as_token("pos_embedding", "positional_embedding")
        norm = "ln_pre"
    for p in ("weight", "bias"):
        add(f"pre_norm.{p}", f"{norm}.{p}")
    pattern = re.compile(rf"^{re.escape(prefix + stored_blocks)}\.(\d+)\.")
    blocks = sorted({int(m.group(1)) for n in view if (m := pattern.match(n))})
    for i in blocks:
        src = f"{stored_blocks}.{i}."
        for mine, theirs in _BLOCK_NAMES[layout].items():
            for p in ("weight", "bias"):
                add(f"transformer.{i}.{mine}.{p}", f"{src}{theirs}.{p}")
        if layout == "open_clip":
            add(f"transformer.{i}.attn.to_qkv.weight", f"{src}attn.in_proj_weight")
            add(f"transformer.{i}.attn.to_qkv.bias", f"{src}attn.in_proj_bias")
            continue
        for p in ("weight", "bias"):
            parts = [prefix + f"{src}self_attn.{x}_proj.{p}" for x in "qkv"]
            if all(k in view for k in parts):
                shapes = [view.shape(k) for k in parts]
                getters = [_reader(view, k, scales) for k in parts]
                out.add(f"transformer.{i}.attn.to_qkv.{p}", (sum(s[0] for s in shapes), *shapes[0][1:]),
                        lambda gs=getters: torch.cat([g() for g in gs], dim=0))
    return out, layout


def _num_heads(view: CanonicalView, dim: int, num_heads: int | None) -> int:
    if num_heads is not None:
        return num_heads
    if _HEADS_KEY in view.metadata:
        return int(view.metadata[_HEADS_KEY])
    if _HEADS_KEY in view.ckpt:
        return int(view.ckpt[_HEADS_KEY])
    if dim in HEADS_BY_WIDTH:
        return HEADS_BY_WIDTH[dim]
    raise CheckpointError(view.path, (
        f"cannot tell the attention head count of a width-{dim} ViT (known widths: {sorted(HEADS_BY_WIDTH)}); "
        f"pass num_heads or add '{_HEADS_KEY}' metadata"))


def infer_clip_vision_config(view: CanonicalView, tensors: TensorMap, num_heads: int | None = None) -> ClipVisionConfig:
    """Sizes from shapes: width and patch from the conv, image size from the position table."""
    for need in ("patch_embedding.weight", "pos_embedding", "transformer.0.mlp.0.weight"):
        if need not in tensors:
            raise CheckpointError(view.path, f"CLIP vision encoder is missing {need!r} (or its equivalent)")
    dim, _, patch, _ = tensors.shape("patch_embedding.weight")
    tokens = tensors.shape("pos_embedding")[1]
    grid = math.isqrt(tokens - 1)
    if grid * grid + 1 != tokens:
        raise CheckpointError(view.path, f"position table of {tokens} tokens is not 1 + a square grid")
    layers = {int(m.group(1)) for n in tensors if (m := re.match(r"transformer\.(\d+)\.", n))}
    return ClipVisionConfig(dim=dim, patch_size=patch, image_size=grid * patch,
                            num_heads=_num_heads(view, dim, num_heads), num_layers=max(layers) + 1,
                            mlp_dim=tensors.shape("transformer.0.mlp.0.weight")[0])


def load_clip_vision(path: str | os.PathLike, *, config: ClipVisionConfig | None = None, num_heads: int | None = None,
                     dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu") -> ClipVisionEncoder:
    """CLIP vision checkpoint -> `ClipVisionEncoder` (fp16 by default, as the reference runs it)."""
    view = canonical_view(open_checkpoint(path))
    tensors, _ = clip_vision_tensors(view)
    cfg = config or infer_clip_vision_config(view, tensors, num_heads)
    if cfg.dim % cfg.num_heads:
        raise CheckpointError(path, f"width {cfg.dim} is not divisible by {cfg.num_heads} heads")
    model = build_on_meta(lambda: ClipVisionEncoder(cfg))
    return load_module(model, tensors, dtype=dtype, device=device, keep_fp8=False, source=str(path))
