"""Wan2.1-I2V base DiT file(s) + InfiniteTalk patch (+ LoRAs) -> ready `InfiniteTalkDiT`.

Accepted: the base as one file, a list of shard files, a `*.safetensors.index.json` or a folder; the
InfiniteTalk tensors (330 names) either inside the base or in a separate `patch` file (MeiGen
single/multi, Comfy-Org model_patches, Kijai fp16 / fp8-scaled), with any wrapper prefix. Tensors are
read one at a time and stored at `dtype` (fp8 weights stay fp8), so host memory peaks at about the
model's size at its storage dtype. The architecture comes from tensor shapes; what shapes cannot tell
(head count of non-standard files, audio layer count) from safetensors metadata `infinitetalk.*` or
the explicit `num_heads=` / `config=` arguments.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.lazy import LazyTensors
from ..checkpoints.lora import apply_loras, attach_low_rank
from ..checkpoints.layout import CanonicalView, canonical_view
from ..checkpoints.materialize import build_on_meta, load_module
from ..errors import CheckpointError, InputError
from ..checkpoints.reader import Checkpoint, join_shards, open_checkpoint
from ..models.dit import DiTConfig, InfiniteTalkDiT
from ..ops.attention import resolve_attention

__all__ = ["load_dit", "infer_dit_config", "is_audio_key", "BASE_ANCHORS", "PATCH_ANCHORS", "REAL_HEAD_DIM"]

PathLike = str | os.PathLike
BASE_ANCHORS = ("head.modulation", "patch_embedding.weight")
PATCH_ANCHORS = ("audio_proj.proj1.weight", "blocks.0.audio_cross_attn.q_linear.weight")
REAL_HEAD_DIM = 128  # every published Wan2.1 DiT (1.3B: 12×128, 14B: 40×128)
DEFAULT_AUDIO_LAYERS = 12  # wav2vec2-base hidden states used by InfiniteTalk
_AUDIO_KEY = re.compile(r"^(audio_proj\.|blocks\.\d+\.(audio_cross_attn|norm_x)\.)")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.self_attn\.q\.weight$")
_SHAPE_FIELDS = ("dim", "ffn_dim", "num_layers", "in_dim", "out_dim", "text_dim", "image_dim", "freq_dim",
                 "intermediate_dim", "output_dim", "context_tokens", "patch_size", "norm_input_visual",
                 "norm_output_audio", "audio_window", "audio_channels")


def is_audio_key(name: str) -> bool:
    """True for a canonical name of the InfiniteTalk additions (audio projector, audio cross-attention, its norm)."""
    return _AUDIO_KEY.match(name) is not None


class _Merged(LazyTensors):
    """Canonical name -> tensor over several canonical views; later views win."""

    def __init__(self, views: Sequence[CanonicalView]):
        super().__init__({name: view for view in views for name in view})

    def _load(self, key: str, view: CanonicalView) -> torch.Tensor:
        return view[key]

    def shape(self, key: str) -> torch.Size:
        return self._index[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._index[key].dtype(key)

    def packed_type(self, key: str) -> int | None:
        return self._index[key].packed_type(key)

    def packed(self, key: str) -> torch.Tensor:
        return self._index[key].packed(key)


def _open_base(base: PathLike | Sequence[PathLike]) -> Checkpoint:
    """One checkpoint over a file, an index, a folder, or a list of shard files."""
    if isinstance(base, (str, os.PathLike)):
        return open_checkpoint(base)
    shards = [open_checkpoint(p) for p in base]
    if not shards:
        raise InputError("base", "expected a DiT file, a folder or a non-empty list of shard files")
    if len(shards) == 1:
        return shards[0]
    owner: dict[str, Checkpoint] = {}
    for shard in shards:
        for key in shard:
            if key in owner:
                raise CheckpointError(shard.path, f"tensor {key!r} also appears in {owner[key].path}")
            owner[key] = shard
    metadata = {k: v for shard in shards for k, v in shard.metadata.items()}
    return join_shards(Path(shards[0].path), owner, metadata)


def _view(ckpt: Checkpoint, anchors: Sequence[str]) -> CanonicalView:
    """canonical_view, plus stripping an unknown wrapper prefix found in front of an anchor name."""
    view = canonical_view(ckpt, anchors=anchors)
    if any(a in view for a in anchors):
        return view
    for name in view:
        anchor = next((a for a in anchors if name.endswith("." + a)), None)
        if anchor is None:
            continue
        return view.strip_prefix(name[: -len(anchor)])
    return view


def _check_not_quanto(ckpt: Checkpoint) -> None:
    if any(k.endswith(("._data", "._scale")) for k in ckpt):
        raise CheckpointError(ckpt.path, "optimum-quanto quantised files (MeiGen quant_models) are not supported; "
                                         "use a bf16/fp16/fp8(-scaled) safetensors DiT")


def _meta_int(metas: Sequence[Mapping[str, str]], key: str, source: str) -> int | None:
    """Integer safetensors metadata `infinitetalk.<key>` (first file that has it), else None."""
    for meta in metas:
        if f"infinitetalk.{key}" in meta:
            try:
                return int(meta[f"infinitetalk.{key}"])
            except ValueError as exc:
                raise CheckpointError(source, f"metadata infinitetalk.{key} is not an integer") from exc
    return None


def infer_dit_config(tensors: LazyTensors, metadata: Sequence[Mapping[str, str]] = (),
                     overrides: Mapping[str, Any] | None = None, source: str = "checkpoint") -> DiTConfig:
    """DiTConfig from tensor shapes; `overrides` set what shapes cannot tell and must agree elsewhere."""
    shape = tensors.shape
    pe = shape("patch_embedding.weight")
    dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
    layers = sorted(int(m.group(1)) for k in tensors if (m := _BLOCK_KEY.match(k)))
    if layers != list(range(len(layers))) or not layers:
        raise CheckpointError(source, f"transformer blocks are not numbered 0..N−1 (found {layers[:8]}...)")
    p1, pvf = shape("audio_proj.proj1.weight"), shape("audio_proj.proj1_vf.weight")
    intermediate, output_dim = p1[0], shape("blocks.0.audio_cross_attn.kv_linear.weight")[1]
    vae_scale = int((overrides or {}).get("vae_scale", 4))
    per_frame = (pvf[1] - p1[1]) // (vae_scale - 1)
    if per_frame <= 0 or p1[1] % per_frame or (pvf[1] - p1[1]) % (vae_scale - 1):
        raise CheckpointError(source, f"audio_proj.proj1 / proj1_vf widths {p1[1]} / {pvf[1]} do not fit a "
                                      f"window of video frames × wav2vec features")
    audio_layers = (overrides or {}).get("audio_layers") or _meta_int(metadata, "audio_layers", source)
    if audio_layers is None:
        audio_layers = DEFAULT_AUDIO_LAYERS
    if per_frame % audio_layers:
        raise CheckpointError(source, f"audio features per frame ({per_frame}) are not a multiple of "
                                      f"{audio_layers} wav2vec layers; set metadata infinitetalk.audio_layers")
    num_heads = (overrides or {}).get("num_heads") or _meta_int(metadata, "num_heads", source)
    if num_heads is None:
        if dim % REAL_HEAD_DIM:
            raise CheckpointError(source, f"cannot infer the head count: dim {dim} is not a multiple of "
                                          f"{REAL_HEAD_DIM}; pass num_heads= or set metadata infinitetalk.num_heads")
        num_heads = dim // REAL_HEAD_DIM
    found = dict(
        dim=dim, ffn_dim=shape("blocks.0.ffn.0.weight")[0], num_heads=int(num_heads), num_layers=len(layers),
        in_dim=in_dim, out_dim=shape("head.head.weight")[0] // max(1, pe[2] * pe[3] * pe[4]),
        freq_dim=shape("time_embedding.0.weight")[1], text_dim=shape("text_embedding.0.weight")[1],
        patch_size=patch, audio_window=p1[1] // per_frame, intermediate_dim=intermediate, output_dim=output_dim,
        context_tokens=shape("audio_proj.proj3.weight")[0] // output_dim, vae_scale=vae_scale,
        norm_input_visual="blocks.0.norm_x.weight" in tensors, norm_output_audio="audio_proj.norm.weight" in tensors,
        image_dim=shape("img_emb.proj.1.weight")[1], audio_layers=int(audio_layers),
        audio_channels=per_frame // int(audio_layers),
    )
    known = {f.name for f in dataclasses.fields(DiTConfig)}
    for key, value in (overrides or {}).items():
        if key not in known:
            raise InputError("config", f"unknown DiT config field {key!r}")
        want = tuple(value) if isinstance(value, list) else value
        if key in _SHAPE_FIELDS and found[key] != want:
            raise CheckpointError(source, f"config {key}={value!r} does not match the file ({found[key]!r})")
        found[key] = want
    try:
        return DiTConfig(**found)
    except ValueError as exc:
        raise CheckpointError(source, str(exc)) from exc


def _require_parts(tensors: LazyTensors, base_path: str, patch_path: str | None) -> None:
    missing_base = [a for a in BASE_ANCHORS + ("img_emb.proj.1.weight",) if a not in tensors]
    if missing_base:
        raise CheckpointError(base_path, f"not a Wan2.1 I2V DiT: missing {', '.join(missing_base)} "
                                         "(an InfiniteTalk patch or a text-to-video model given as the base?)")
    if not all(a in tensors for a in PATCH_ANCHORS + ("audio_proj.proj1_vf.weight", "audio_proj.proj3.weight")):
        where = "the patch file given has" if patch_path else "the base model has"
        raise CheckpointError(patch_path or base_path, f"{where} no InfiniteTalk audio tensors (audio_proj.*, "
                                         "blocks.N.audio_cross_attn.*): the InfiniteTalk patch file is needed "
                                         "(e.g. infinitetalk_single.safetensors / infinitetalk_multi.safetensors)")


def load_dit(base: PathLike | Sequence[PathLike], patch: PathLike | None = None,
             loras: Sequence[tuple[PathLike, float]] = (), *, dtype: torch.dtype = torch.bfloat16,
             device: str | torch.device = "cpu", attention: str = "sdpa", num_heads: int | None = None,
             config: Mapping[str, Any] | None = None) -> InfiniteTalkDiT:
    """Build the InfiniteTalk DiT from the Wan2.1-I2V base (+ InfiniteTalk `patch`, + `loras`).

    `dtype`: storage and activation dtype (bf16 default; float32 for parity); fp8 weights stay fp8.
    `num_heads`: head count when the file's heads are not 128 wide (else metadata or dim/128).
    `config`: other DiTConfig fields the file cannot tell (`text_len`, `eps`, `audio_layers`, ...);
    shape-determined fields given here must match the file.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError("dtype", f"expected torch.bfloat16, float16 or float32, got {dtype}")
    resolve_attention(attention)  # unknown name or missing package (flash-attn, sageattention): fail before reading
    overrides = dict(config or {})
    if num_heads is not None:
        if overrides.get("num_heads", num_heads) != num_heads:
            raise InputError("num_heads", f"{num_heads} contradicts config num_heads={overrides['num_heads']}")
        overrides["num_heads"] = num_heads
    base_ckpt = _open_base(base)
    _check_not_quanto(base_ckpt)
    views = [_view(base_ckpt, BASE_ANCHORS + PATCH_ANCHORS)]
    metadata = [base_ckpt.metadata]
    if patch is not None:
        patch_ckpt = open_checkpoint(patch)
        _check_not_quanto(patch_ckpt)
        patch_view = _view(patch_ckpt, PATCH_ANCHORS)
        patch_view.names = {k: v for k, v in patch_view.names.items() if is_audio_key(k)}
        patch_view.scale_keys = {k: v for k, v in patch_view.scale_keys.items() if is_audio_key(k)}
        if not patch_view.names:
            raise CheckpointError(patch_ckpt.path, "holds no InfiniteTalk audio tensors (audio_proj.*, "
                                                   "blocks.N.audio_cross_attn.*, blocks.N.norm_x.*)")
        views[0].scale_keys = {k: v for k, v in views[0].scale_keys.items() if not is_audio_key(k)}
        views.append(patch_view)
        metadata.insert(0, patch_ckpt.metadata)
    tensors = _Merged(views)
    source = str(base_ckpt.path)
    _require_parts(tensors, source, str(patch) if patch is not None else None)
    cfg = infer_dit_config(tensors, metadata, overrides, source=source)
    scales: dict[str, torch.Tensor] = {}
    for view in views:
        scales.update(view.scales())
    merged: Mapping[str, torch.Tensor] = tensors
    if loras:
        merged, scales = apply_loras(tensors, scales, [(p, float(s)) for p, s in loras], dtype=dtype,
                                     device=device)
    model = build_on_meta(lambda: InfiniteTalkDiT(cfg, compute_dtype=dtype, attention=attention))
    load_module(model, merged, dtype=dtype, device=device, scales=scales, source=source)
    attach_low_rank(model, merged, dtype=dtype, device=device)  # LoRAs on fp8/GGUF weights stay unmerged
    return model
