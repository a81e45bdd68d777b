"""Header-only stand-ins for the real 14B model files: real key names, shapes and dtypes, no weights.

Each file is a valid safetensors header followed by a data section of the right length that is a hole
(the file is extended with `truncate`, so a "16 GB" file takes a few kB of disk on filesystems with sparse
files). The checkpoint reader accepts them (sizes agree), detection sorts them by content like the real
ones, and `python -m infinitetalk plan` sizes them from their headers; loading their weights would read
zeros. Used by the memory-plan tests; not part of `make-tiny-models`.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..checkpoints.materialize import build_on_meta

__all__ = ["write_sparse_safetensors", "write_real_layouts", "REAL_FILES"]

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
              torch.int64: "I64", torch.uint8: "U8"}
REAL_FILES = {
    "dit": "diffusion_models/wan2.1_i2v_480p_14B_fp8_scaled.safetensors",
    "patch": "model_patches/Wan2_1-InfiniteTalk-Multi_fp16.safetensors",
    "lora": "loras/Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64_bf16.safetensors",
    "vae": "vae/wan_2.1_vae.safetensors",
    "t5": "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "clip": "clip_vision/clip_vision_h.safetensors",
    "wav2vec2": "audio_encoders/wav2vec2-chinese-base_fp16.safetensors",
}
LORA_RANK = 64


def write_sparse_safetensors(entries: dict[str, tuple[tuple[int, ...], torch.dtype]], path: str | Path,
                             metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file whose header lists `entries` (name -> (shape, dtype)) and whose data is a hole."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, (shape, dtype) in entries.items():
        n = 1
        for s in shape:
            n *= int(s)
        size = n * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return path


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _dit_files(root: Path) -> list[Path]:
    """Comfy-Org `fp8_scaled` base (block Linears fp8 + scale_weight, the rest bf16), Kijai's fp16 multi
    patch and a rank-64 lightx2v LoRA, all with the 14B shapes."""
    from ..loaders.dit import is_audio_key
    from ..models.dit import DiTConfig, InfiniteTalkDiT
    from ..models.layers import Linear

    cfg = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
    model = build_on_meta(lambda: InfiniteTalkDiT(cfg))
    shapes = _shapes(model)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    base: dict = {}
    patch: dict = {}
    lora: dict = {}
    for name, shape in shapes.items():
        if is_audio_key(name):
            patch[name] = (shape, torch.float16)
            continue
        if name in linears and name.startswith("blocks."):
            layer = name[: -len(".weight")]
            base[name] = (shape, torch.float8_e4m3fn)
            base[layer + ".scale_weight"] = ((1,), torch.float32)
            base[layer + ".scale_input"] = ((1,), torch.float32)
            lora[f"diffusion_model.{layer}.lora_down.weight"] = ((LORA_RANK, shape[1]), torch.bfloat16)
            lora[f"diffusion_model.{layer}.lora_up.weight"] = ((shape[0], LORA_RANK), torch.bfloat16)
        else:
            base[name] = (shape, torch.bfloat16)
    base["scaled_fp8"] = ((0,), torch.float8_e4m3fn)
    return [write_sparse_safetensors(base, root / REAL_FILES["dit"]),
            write_sparse_safetensors(patch, root / REAL_FILES["patch"]),
            write_sparse_safetensors(lora, root / REAL_FILES["lora"])]


def _encoder_files(root: Path) -> list[Path]:
    """umT5-XXL (HF names, fp8 scaled), CLIP ViT-H/14 vision (HF names, fp16), wav2vec2-base (fp16), VAE (bf16)."""
    from ..models.t5 import T5Config, T5Encoder
    from ..models.vae import WanVAE
    from ..models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Encoder
    from .t5 import _hf_name

    t5: dict = {}
    for name, shape in _shapes(build_on_meta(lambda: T5Encoder(T5Config()))).items():
        hf = _hf_name(name)
        if len(shape) == 2 and hf.startswith("encoder.block."):
            t5[hf] = (shape, torch.float8_e4m3fn)
            t5[hf[: -len(".weight")] + ".scale_weight"] = ((1,), torch.float32)
        else:
            t5[hf] = (shape, torch.float16)
    t5["scaled_fp8"] = ((0,), torch.float8_e4m3fn)
    wav2vec2 = _shapes(build_on_meta(lambda: Wav2Vec2Encoder(Wav2Vec2Config())))
    vae = _shapes(build_on_meta(WanVAE))
    return [write_sparse_safetensors(t5, root / REAL_FILES["t5"]),
            write_sparse_safetensors(_clip_vit_h(), root / REAL_FILES["clip"]),
            write_sparse_safetensors({k: (s, torch.float16) for k, s in wav2vec2.items()}, root / REAL_FILES["wav2vec2"]),
            write_sparse_safetensors({k: (s, torch.bfloat16) for k, s in vae.items()}, root / REAL_FILES["vae"])]


def _clip_vit_h(dim: int = 1280, layers: int = 32, mlp: int = 5120, patch: int = 14, tokens: int = 257,
                proj: int = 1024) -> dict:
    """HF CLIPVisionModelWithProjection names of ViT-H/14 (what ComfyUI's clip_vision_h holds)."""
    f16 = torch.float16
    out: dict = {
        "vision_model.embeddings.patch_embedding.weight": ((dim, 3, patch, patch), f16),
        "vision_model.embeddings.class_embedding": ((dim,), f16),
        "vision_model.embeddings.position_embedding.weight": ((tokens, dim), f16),
        "vision_model.embeddings.position_ids": ((1, tokens), torch.int64),
        "visual_projection.weight": ((proj, dim), f16),
    }
    for p in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{p}"] = ((dim,), f16)
        out[f"vision_model.post_layernorm.{p}"] = ((dim,), f16)
    for i in range(layers):
        pre = f"vision_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            vec = p == "bias"
            for norm in ("layer_norm1", "layer_norm2"):
                out[f"{pre}{norm}.{p}"] = ((dim,), f16)
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[f"{pre}self_attn.{name}.{p}"] = ((dim,) if vec else (dim, dim), f16)
            out[f"{pre}mlp.fc1.{p}"] = ((mlp,) if vec else (mlp, dim), f16)
            out[f"{pre}mlp.fc2.{p}"] = ((dim,) if vec else (dim, mlp), f16)
    return out


def write_real_layouts(models_dir: str | Path) -> list[Path]:
    """Every component of a 480p fast-preset job as header-only files in a ComfyUI-style models tree."""
    root = Path(models_dir)
    return _dit_files(root) + _encoder_files(root)
