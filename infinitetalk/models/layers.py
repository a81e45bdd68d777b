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
per-tensor activation scale instead of dequantising them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.quants import dequantize_blocks

__all__ = ["Linear", "dequantize", "scaled_mm_linear", "fp8_matmul_fits", "FP8_MAX"]

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


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
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x·(scale·W)ᵀ + b with fp8 operands: x is quantised per call to e4m3 with a per-tensor scale
    amax/448, W stays as stored; a per-row weight scale multiplies the output. Result in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    lo, hi = torch.aminmax(x2)   # max |x| without an |x| copy of the activations
    x_scale = (torch.maximum(-lo, hi).float() / FP8_MAX).clamp_min(1e-12)
    # one float32 copy, scaled and clamped in place (activations of a 14B DiT are GiB-sized per call)
    xq = x2.to(torch.float32, copy=True).div_(x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    per_tensor = scale is not None and scale.numel() == 1
    w_scale = scale.reshape(()).to(device=x.device, dtype=torch.float32) if per_tensor else one
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
    if scale is not None and not per_tensor:
        out = out * scale.reshape(1, -1).to(device=x.device, dtype=x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear computing in the input's dtype, whatever the stored weight dtype."""

    weight_scale: torch.Tensor | None
    lora_down: torch.Tensor | None
    lora_up: torch.Tensor | None
    gguf_type: int | None = None  # GGML quantisation type of a packed `weight`
    fp8_matmul: bool = False

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
            out = scaled_mm_linear(x, self.weight, self.weight_scale, self.bias)
        else:
            b = self.bias
            if b is not None and b.dtype != x.dtype:
                b = b.to(x.dtype)
            out = F.linear(x, self.dequantized_weight(x.dtype), b)
        if self.lora_down is not None:
            out = out + F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        return out
