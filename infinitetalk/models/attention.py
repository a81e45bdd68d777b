"""The one attention entry point of the DiT, with an explicit backend choice.

The reference silently switches to SageAttention (int8 QK, lossy) when that package happens to be
importable; here a kernel is only used when asked for by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_BACKENDS", "attention", "check_backend"]

ATTENTION_BACKENDS = ("sdpa", "math")


def check_backend(backend: str) -> str:
    """Return `backend` if known, else raise ValueError listing the known ones."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(ATTENTION_BACKENDS)}")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v over `[batch, heads, tokens, d]` tensors, no mask, no dropout.

    - "sdpa": `F.scaled_dot_product_attention` (PyTorch picks flash / memory-efficient / math).
    - "math": the explicit formula in the input dtype (slow; a debugging reference).
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))
        return torch.matmul(scores.softmax(dim=-1), v)
    raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(ATTENTION_BACKENDS)}")
