"""Layers shared by every model: storage dtype may differ from compute dtype.

Weights may be stored in bf16/fp16 or fp8 (with a scale) while activations run in another dtype.
Casting happens per call on the weight alone, so fp8 files stay fp8 in memory. State-dict names are
exactly nn.Linear's (`weight`, `bias`); the fp8 scale is a non-persistent buffer the loader fills.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "dequantize"]


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`weight` as `dtype`, multiplied by `scale` (scalar or broadcastable per-row) when given."""
    w = weight.to(dtype)
    if scale is not None:
        w = w * scale.to(device=w.device, dtype=dtype)
    return w


class Linear(nn.Linear):
    """nn.Linear computing in the input's dtype, whatever the stored weight dtype."""

    weight_scale: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight_scale", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype or self.weight_scale is not None:
            w = dequantize(w, self.weight_scale, x.dtype)
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)
