"""Tiny GGUF files for tests, laid out like city96's ComfyUI-GGUF conversions of Wan / InfiniteTalk.

`save_gguf(state, path, "Q4_K_M")` writes canonical tensors: 1-D tensors (norms, biases) as F32, weights
of >= 2 dims quantised (the `_M` mixes put Q6_K on the FFN output and attention `v` weights, as
llama.cpp's medium mixes favour some layers), tensors whose element count is not a multiple of the
block size as F16. Like ComfyUI-GGUF, a tensor of more than 4 dims, or whose rows are not a multiple of
the block size, is stored as `[numel/256, 256]` (or flat) with its shape in `comfy.gguf.orig_shape.<name>`.
K-quant blocks are encoded here (the `gguf` package only decodes them): a plain absmax encoder, not
llama.cpp's error-minimising search, which is all a test of the decoder needs.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_gguf", "GGUF_MIXES", "quantize_k"]

# mix -> (default type, type of the favoured layers)
GGUF_MIXES = {"Q8_0": ("Q8_0", "Q8_0"), "Q6_K": ("Q6_K", "Q6_K"), "Q5_K_M": ("Q5_K", "Q6_K"),
              "Q4_K_M": ("Q4_K", "Q6_K"), "Q5_0": ("Q5_0", "Q5_0"), "Q4_0": ("Q4_0", "Q4_0"),
              "Q4_1": ("Q4_1", "Q4_1"), "Q5_1": ("Q5_1", "Q5_1")}
_FAVOURED = (".ffn.2.weight", ".self_attn.v.weight", ".audio_cross_attn.kv_linear.weight")


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _k_sub(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: x `[n, 8, 32]` -> (d, dmin, 6-bit scales, 6-bit mins); value = d·sc·q − dmin·m, q in 0..levels."""
    mn = np.maximum(-x.min(axis=-1), 0)
    scale = (x.max(axis=-1) + mn) / levels
    d = (scale.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (mn.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.round(mn / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63).astype(np.uint8)
    return d, dmin, sc, m


def _k_scale_bytes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _k_q(x: np.ndarray, d, dmin, sc, m, levels: int) -> np.ndarray:
    step = d[:, None] * sc
    q = np.round((x + (dmin[:, None] * m)[..., None]) / np.where(step > 0, step, 1)[..., None])
    return np.clip(np.where(step[..., None] > 0, q, 0), 0, levels).astype(np.uint8)  # [n, 8, 32]


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 8, 32] 4-bit values -> 128 bytes: chunk c holds group 2c (low) and 2c+1 (high)."""
    q = q.reshape(q.shape[0], 4, 2, 32) & 0x0F
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def quantize_k(x: np.ndarray, kind: str) -> np.ndarray:
    """float32 `[rows, cols]` (cols % 256 == 0) -> uint8 blocks `[rows, cols/256 · size]` of Q4_K, Q5_K or Q6_K."""
    rows = x.shape[0]
    blocks = x.reshape(-1, 256).astype(np.float32)
    n = blocks.shape[0]
    if kind == "Q6_K":
        sub = blocks.reshape(n, 16, 16)
        scale = np.abs(sub).max(axis=-1) / 31.5
        d = (scale.max(axis=-1) / 127).astype(np.float16).astype(np.float32)
        sc = np.clip(np.round(scale / np.where(d > 0, d, 1)[:, None]), -128, 127).astype(np.int8)
        step = d[:, None] * sc
        q = np.round(sub / np.where(step > 0, step, 1)[..., None]) + 32
        q = np.clip(np.where(step[..., None] > 0, q, 32), 0, 63).astype(np.uint8).reshape(n, 2, 4, 32)
        low, high = q & 0x0F, q >> 4
        ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(n, 128)
        qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
        out = np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)
    elif kind in ("Q4_K", "Q5_K"):
        levels = 15 if kind == "Q4_K" else 31
        sub = blocks.reshape(n, 8, 32)
        d, dmin, sc, m = _k_sub(sub, levels)
        q = _k_q(sub, d, dmin, sc, m, levels)
        parts = [_f16_bytes(d), _f16_bytes(dmin), _k_scale_bytes(sc, m)]
        if kind == "Q5_K":
            high = (q >> 4) & 1  # bit i of qh[pos] = 5th bit of group i
            parts.append(sum((high[:, i] << i) for i in range(8)).astype(np.uint8))
        out = np.concatenate(parts + [_low_nibbles(q)], axis=1)
    else:
        raise ValueError(f"not a K-quant this writer encodes: {kind}")
    return out.reshape(rows, -1)


def _quantize(x: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    if kind in ("Q4_K", "Q5_K", "Q6_K"):
        return quantize_k(x, kind)
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind])


def save_gguf(state: Mapping[str, torch.Tensor], path: str | os.PathLike, mix: str = "Q8_0",
              metadata: Mapping[str, str] | None = None, arch: str = "wan") -> Path:
    """Write `state` as a GGUF file quantised with `mix` (a key of GGUF_MIXES); returns the path."""
    import gguf

    default, favoured = GGUF_MIXES[mix]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch=arch)
    for key, value in (metadata or {}).items():
        writer.add_string(key, str(value))
    for name, tensor in state.items():
        x = tensor.detach().float().cpu().numpy()
        kind = favoured if name.endswith(_FAVOURED) else default
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
        if x.ndim < 2 or x.size % block:
            data = x.astype(np.float32 if x.ndim < 2 else np.float16)
            if data.ndim > 4:
                writer.add_array(f"comfy.gguf.orig_shape.{name}", list(x.shape))
                data = data.reshape(x.shape[0], -1)
            writer.add_tensor(name, data)
            continue
        if x.ndim > 2 or x.shape[-1] % block:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(x.shape))
            x = x.reshape(-1, block)
        q = _quantize(np.ascontiguousarray(x), kind)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
