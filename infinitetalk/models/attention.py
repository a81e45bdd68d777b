"""The one attention entry point of the DiT, with an explicit backend choice.

The reference silently switches to SageAttention (int8 QK, lossy) when that package happens to be
importable; here a kernel is only used when asked for by name. The kernels themselves live in
`ops.attention` (optional packages are imported there, on first use).
"""
from __future__ import annotations

import torch

from ..errors import InputError
from ..ops.attention import resolve_attention
from ..ops.options import ATTENTION_CHOICES

__all__ = ["ATTENTION_BACKENDS", "attention", "check_backend"]

ATTENTION_BACKENDS = ATTENTION_CHOICES


def check_backend(backend: str) -> str:
    """Return `backend` if it is a known name, else raise InputError (a ValueError) listing the known ones.

    Whether its package is installed is checked when the backend is first used (or by
    `runtime.kernels.configure_dit`)."""
    if backend not in ATTENTION_BACKENDS:
        raise InputError("attention", f"unknown attention backend {backend!r}; expected one of "
                                      f"{', '.join(ATTENTION_BACKENDS)}")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v over `[batch, heads, tokens, d]` tensors, no mask, no dropout.

    - "auto": the fastest exact kernel of the device, falling back per shape (`ops.attention.auto_order`).
    - "sdpa": `F.scaled_dot_product_attention` (PyTorch picks flash / memory-efficient / math).
    - "cudnn": SDPA with cuDNN attention first (Hopper).
    - "math": the explicit formula in the input dtype (slow; a debugging reference).
    - "flash" / "fa3" / "sage": flash-attn 2 / 3 / SageAttention when installed (fp16/bf16; float32 goes
      through bf16).
    """
    return resolve_attention(backend)(q, k, v)
