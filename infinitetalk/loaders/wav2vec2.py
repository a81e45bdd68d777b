"""wav2vec2 audio-encoder file(s) -> ready `Wav2Vec2Encoder` (float32 by default, even from fp16 files).

Accepted: a `.safetensors` / `pytorch_model.bin` file or a Hugging Face folder holding one (plus
`config.json`); keys with or without a wrapper prefix (`wav2vec2.` in `Wav2Vec2ForPreTraining`
checkpoints, whose quantizer / project_q / project_hid / masked_spec_embed are ignored); the
positional conv's weight norm as `weight_g`/`weight_v` (old HF, Kijai's and Comfy-Org's fp16 files),
`parametrizations.weight.original0/1` (recent transformers, ComfyUI's own state dict) or already
folded into `weight`.

A `preprocessor_config.json` beside the file sets `model.normalize_input` (its `do_normalize`).

Config: explicit argument > `config.json` beside the file > inferred from tensor shapes (+ metadata
`infinitetalk.conv_stride`, `infinitetalk.num_attention_heads`, `infinitetalk.do_stable_layer_norm`
for layouts whose shapes do not tell).
"""
from __future__ import annotations

import json
import os
import re
from collections import ChainMap
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.layout import CanonicalView, canonical_view
from ..checkpoints.materialize import build_on_meta, load_module
from ..errors import CheckpointError
from ..checkpoints.reader import Checkpoint, open_checkpoint
from ..models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Encoder

__all__ = ["load_wav2vec2", "infer_config"]

_ANCHOR = "feature_projection.projection.weight"
_POS = "encoder.pos_conv_embed.conv."
_WEIGHT_NORM_ALIASES = {
    _POS + "parametrizations.weight.original0": _POS + "weight_g",
    _POS + "parametrizations.weight.original1": _POS + "weight_v",
}
_BASE_STRIDES = (5, 2, 2, 2, 2, 2, 2)
_HEAD_DIM = 64


def _resolve_file(path: Path) -> Path:
    """A checkpoint file, or the one in a Hugging Face-style folder."""
    if not path.is_dir():
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    return path  # open_checkpoint handles a folder with one *.safetensors or one index


def _read_json_beside(file: Path, name: str) -> Any:
    """The JSON file `name` in the checkpoint's folder, or None when there is none."""
    p = file.parent / name
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(p, f"unreadable {name}: {exc}") from exc


def _read_config_json(file: Path) -> dict[str, Any] | None:
    d = _read_json_beside(file, "config.json")
    if not isinstance(d, dict) or (d.get("model_type") != "wav2vec2" and "conv_kernel" not in d):
        return None  # none, or a config.json of something else sharing the folder
    return d


def _read_do_normalize(file: Path) -> bool | None:
    """`do_normalize` of a Hugging Face `preprocessor_config.json` beside the file, if there is one."""
    d = _read_json_beside(file, "preprocessor_config.json")
    value = d.get("do_normalize") if isinstance(d, dict) else None
    return bool(value) if value is not None else None


def _find_prefix(ckpt: Checkpoint, view: CanonicalView) -> str:
    hits = [k[: -len(_ANCHOR)] for k in view if k.endswith(_ANCHOR)]
    hits = [h for h in hits if h == "" or h.endswith(".")]
    if len(hits) != 1:
        sample = ", ".join(list(ckpt)[:4])
        what = "several wav2vec2 models" if hits else f"no '{_ANCHOR}' tensor (holds e.g. {sample})"
        raise CheckpointError(ckpt.path, f"not a single wav2vec2 audio encoder: {what}")
    return hits[0]


def _canonical_tensors(ckpt: Checkpoint) -> ChainMap:
    """Mapping HF `Wav2Vec2Model` name -> tensor (lazy), whatever prefix / weight-norm naming the file uses."""
    view = canonical_view(ckpt, anchors=(_ANCHOR,))
    prefix = _find_prefix(ckpt, view)
    names: dict[str, str] = {}
    for name, stored in view.names.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        names[_WEIGHT_NORM_ALIASES.get(name, name)] = stored
    renamed = CanonicalView(ckpt=ckpt, names=names, prefix=view.prefix + prefix)
    computed: dict[str, torch.Tensor] = {}
    folded = _POS + "weight"
    if folded in names and _POS + "weight_v" not in names:
        # weight norm already applied: v = w, g = ‖w‖ per kernel position reproduces w
        w = renamed[folded].to(torch.float32)
        computed[_POS + "weight_v"] = w
        computed[_POS + "weight_g"] = torch.linalg.vector_norm(w, dim=(0, 1), keepdim=True)
    return ChainMap(computed, renamed)


def _layer_indices(tensors, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in tensors if (m := rx.fullmatch(k))})


def _meta(ckpt: Checkpoint, key: str) -> Any:
    raw = ckpt.metadata.get(f"infinitetalk.{key}")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(ckpt.path, f"metadata infinitetalk.{key}={raw!r} is not JSON") from exc


def infer_config(ckpt: Checkpoint, tensors: ChainMap) -> Wav2Vec2Config:
    """Config from tensor shapes; strides / heads / pre-LN from metadata or the base topology's rules."""
    computed, view = tensors.maps

    def shape(name: str) -> tuple[int, ...]:
        return tuple(computed[name].shape) if name in computed else tuple(view.shape(name))

    convs = _layer_indices(tensors, r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight")
    layers = _layer_indices(tensors, r"encoder\.layers\.(\d+)\.attention\.q_proj\.weight")
    needed = [_ANCHOR, _POS + "weight_v", "encoder.layers.0.feed_forward.intermediate_dense.weight"]
    missing = [n for n in needed if n not in tensors]
    if not convs or not layers or missing or convs != list(range(len(convs))) or layers != list(range(len(layers))):
        raise CheckpointError(ckpt.path, f"incomplete wav2vec2 checkpoint (conv layers {convs}, transformer "
                                         f"layers {layers}, missing {missing})")
    conv_shapes = [shape(f"feature_extractor.conv_layers.{i}.conv.weight") for i in convs]
    hidden = shape(_ANCHOR)[0]
    v_shape = shape(_POS + "weight_v")
    if "feature_extractor.conv_layers.1.layer_norm.weight" in tensors:
        norm = "layer"
    elif "feature_extractor.conv_layers.0.layer_norm.weight" in tensors:
        norm = "group"
    else:
        raise CheckpointError(ckpt.path, "wav2vec2 conv layer 0 has no norm (neither 'group' nor 'layer' layout)")
    strides = _meta(ckpt, "conv_stride")
    if strides is None:
        if len(convs) != len(_BASE_STRIDES):
            raise CheckpointError(ckpt.path, f"{len(convs)} conv layers but no infinitetalk.conv_stride metadata: "
                                             "strides are only known for the 7-layer base topology; pass a config")
        strides = _BASE_STRIDES
    heads = _meta(ckpt, "num_attention_heads") or hidden // _HEAD_DIM
    stable = _meta(ckpt, "do_stable_layer_norm")
    try:
        return Wav2Vec2Config(
            hidden_size=hidden,
            num_hidden_layers=len(layers),
            num_attention_heads=int(heads),
            intermediate_size=shape("encoder.layers.0.feed_forward.intermediate_dense.weight")[0],
            conv_dim=[s[0] for s in conv_shapes],
            conv_kernel=[s[2] for s in conv_shapes],
            conv_stride=strides,
            conv_bias="feature_extractor.conv_layers.0.conv.bias" in tensors,
            feat_extract_norm=norm,
            num_conv_pos_embeddings=v_shape[2],
            num_conv_pos_embedding_groups=hidden // v_shape[1],
            do_stable_layer_norm=bool(stable) if stable is not None else norm == "layer",
        )
    except ValueError as exc:
        raise CheckpointError(ckpt.path, f"inconsistent wav2vec2 shapes: {exc}") from exc


def load_wav2vec2(path: str | os.PathLike, config: Wav2Vec2Config | dict | None = None, *,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Wav2Vec2Encoder:
    """Load the audio encoder; `config` may be a `Wav2Vec2Config` or an HF config dict."""
    file = _resolve_file(Path(path))
    ckpt = open_checkpoint(file)
    tensors = _canonical_tensors(ckpt)
    source = str(ckpt.path)
    try:
        if isinstance(config, dict):
            config = Wav2Vec2Config.from_hf_dict(config)
        elif config is None:
            hf = _read_config_json(ckpt.path)
            config = Wav2Vec2Config.from_hf_dict(hf) if hf is not None else None
    except ValueError as exc:
        raise CheckpointError(source, f"unsupported wav2vec2 config: {exc}") from exc
    if config is None:
        config = infer_config(ckpt, tensors)
    cfg = config
    model = build_on_meta(lambda: Wav2Vec2Encoder(cfg))
    model = load_module(model, tensors, dtype=dtype, device=device, source=source)
    do_normalize = _read_do_normalize(ckpt.path)
    if do_normalize is not None:
        model.normalize_input = do_normalize
    return model
