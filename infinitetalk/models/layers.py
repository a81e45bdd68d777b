"""Layers shared by every model: storage dtype may differ from compute dtype.

Weights may be stored in bf16/fp16, fp8 (with a scale) or GGUF blocks while activations run in another
dtype. Casting happens per call on the weight alone, so quantised files stay quantised in memory.
State-dict names are exactly nn.Linear's (`weight`, `bias`); everything else a Linear may carry is a
non-persistent buffer the loaders fill, so block streaming moves it along with the weight:

- `weight_scale`: fp8 dequantisation scale (0-d per tensor, or `[out, 1]` per row);
- `lora_down` `[r, in]` / `lora_up` `[out, r]`: an unmerged low-rank LoRA path, used for quantised weights
  so a LoRA never turns them back into bf16 (strength and alpha/rank are folded into `lora_up`);
- a GGUF weight is `weight` as the file's uint8 blocks `[out, bytes per row]` with `gguf_type` set.

`fp8_matmul` (set by `runtime.kernels.configure_dit`) runs e4m3 weights through `torch._scaled_mm` with a
per-tensor activation scale instead of dequantising them (the activation's quantisation is an `ops.fused` island:
one kernel, no float32 copy, once fusion is on).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import fused
from ..ops.quants import dequantize_blocks

__all__ = ["Linear", "dequantize", "scaled_mm_linear", "fp8_matmul_fits", "fp8_matmul_workspace_bytes", "FP8_MAX"]

FP8_MAX = fused.E4M3_MAX  # 448


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`weight` as `dtype`, multiplied by `scale` (scalar or broadcastable per-row) when given."""
    w = weight.to(dtype)
    if scale is not None:
        w = w * scale.to(device=w.device, dtype=dtype)
    return w


def fp8_matmul_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `torch._scaled_mm` can take this call: e4m3 weight, 16-aligned dims, float activations."""
    return (weight.dtype == torch.float8_e4m3fn and weight.dim() == 2 and weight.shape[0] % 16 == 0
            and weight.shape[1] % 16 == 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and x.device == weight.device)


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                     bias: torch.Tensor | None, fast_accum: bool = False) -> torch.Tensor:
    """x·(scale·W)ᵀ + b with fp8 operands: x is quantised per call to e4m3 with a per-tensor scale
    amax/448, W stays as stored; a per-row weight scale multiplies the output. Result in x's dtype.

    The bias goes into `_scaled_mm`'s epilogue (per-tensor weight scale, half-precision output);
    `fast_accum`: Hopper's faster fp8 accumulation (fewer promotions to float32; slightly less exact)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    lo, hi = torch.aminmax(x2)   # max |x| without an |x| copy of the activations
    x_scale = (torch.maximum(-lo, hi).float() / FP8_MAX).clamp_min(1e-12)
    xq = fused.quantize_e4m3(x2, x_scale)
    per_tensor = scale is not None and scale.numel() == 1
    w_scale = (scale.reshape(()).to(device=x.device, dtype=torch.float32) if per_tensor
               else torch.ones((), device=x.device, dtype=torch.float32))
    b = None if bias is None else bias.to(x.dtype)
    in_epilogue = b is not None and (scale is None or per_tensor) and x.dtype in (torch.bfloat16, torch.float16)
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale, bias=b if in_epilogue else None,
                           out_dtype=x.dtype, use_fast_accum=fast_accum)
    if scale is not None and not per_tensor:
        out = out * scale.reshape(1, -1).to(device=x.device, dtype=x.dtype)
    if b is not None and not in_epilogue:
        out = out + b
    return out.reshape(*shape[:-1], weight.shape[0])


def fp8_matmul_workspace_bytes(rows: int, in_features: int) -> int:
    """Bytes `scaled_mm_linear` holds beyond its input and output while multiplying `rows` activations of
    width `in_features`: the e4m3 copy, plus the float32 quotient of one quantisation chunk (eager; a fused
    quantisation has none). For the memory plan: the largest call is the FFN's second Linear (in = ffn_dim)."""
    n = rows * in_features
    return n + 4 * min(n, fused.QUANTIZE_CHUNK)


class Linear(nn.Linear):
    """nn.Linear computing in the input's dtype, whatever the stored weight dtype."""

    weight_scale: torch.Tensor | None
    lora_down: torch.Tensor | None
    lora_up: torch.Tensor | None
    gguf_type: int | None = None  # GGML quantisation type of a packed `weight`
    fp8_matmul: bool = False
    fp8_fast_accum: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight_scale", None, persistent=False)
        self.register_buffer("lora_down", None, persistent=False)
        self.register_buffer("lora_up", None, persistent=False)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a `[out, in]` tensor of `dtype` (no LoRA path included)."""
        w = self.weight
        if self.gguf_type is not None:
            return dequantize_blocks(w, self.gguf_type, (self.out_features, self.in_features), dtype)
        if w.dtype != dtype or self.weight_scale is not None:
            w = dequantize(w, self.weight_scale, dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul and self.gguf_type is None and fp8_matmul_fits(x, self.weight):
            out = scaled_mm_linear(x, self.weight, self.weight_scale, self.bias, self.fp8_fast_accum)
        else:
            b = self.bias
            if b is not None and b.dtype != x.dtype:
                b = b.to(x.dtype)
            out = F.linear(x, self.dequantized_weight(x.dtype), b)
        if self.lora_down is not None:
            out = out + F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        return out
