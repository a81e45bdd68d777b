"""Attention kernels by name: `sdpa` (default), `flash` (flash-attn), `sage` (SageAttention), `math`.

A kernel is used only when asked for by name; optional packages are imported the first time their
backend is resolved, never at import of this module, and asking for one that is not installed is an
InputError naming the package to install. Every kernel takes and returns `[batch, heads, tokens, d]`.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from .options import ATTENTION_CHOICES

__all__ = ["AttentionKernel", "KERNELS", "resolve_attention", "attention_available"]

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_HALF = (torch.float16, torch.bfloat16)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))
    return torch.matmul(scores.softmax(dim=-1), v)


def _as_half(x: torch.Tensor) -> torch.Tensor:
    """flash/sage kernels take fp16/bf16 only; float32 activations go through bf16 (as Wan's reference does)."""
    return x if x.dtype in _HALF else x.to(torch.bfloat16)


def _flash(module) -> Kernel:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = module.flash_attn_func(_as_half(q).transpose(1, 2), _as_half(k).transpose(1, 2),
                                     _as_half(v).transpose(1, 2))  # flash-attn wants [b, tokens, heads, d]
        return out.transpose(1, 2).to(q.dtype)
    return run


def _sage(module) -> Kernel:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return module.sageattn(_as_half(q), _as_half(k), _as_half(v), tensor_layout="HND").to(q.dtype)
    return run


@dataclass(frozen=True)
class AttentionKernel:
    """`package`: the optional module to import (None = built into PyTorch); `make(module)` -> kernel."""

    name: str
    package: str | None
    pip_name: str | None
    make: Callable[[object], Kernel]


KERNELS: dict[str, AttentionKernel] = {
    "sdpa": AttentionKernel("sdpa", None, None, lambda _: _sdpa),
    "math": AttentionKernel("math", None, None, lambda _: _math),
    "flash": AttentionKernel("flash", "flash_attn", "flash-attn", _flash),
    "sage": AttentionKernel("sage", "sageattention", "sageattention", _sage),
}
assert tuple(sorted(KERNELS)) == tuple(sorted(ATTENTION_CHOICES))
_resolved: dict[str, Kernel] = {"sdpa": _sdpa, "math": _math}


def resolve_attention(name: str) -> Kernel:
    """The kernel for `name`; InputError for an unknown name or a backend whose package is missing."""
    kernel = _resolved.get(name)
    if kernel is not None:
        return kernel
    spec = KERNELS.get(name)
    if spec is None:
        raise InputError("attention", f"unknown attention backend {name!r}; expected one of "
                                      f"{', '.join(ATTENTION_CHOICES)}")
    try:
        module = importlib.import_module(spec.package)
    except ImportError as exc:
        raise InputError("attention", f"backend {name!r} needs the Python package {spec.package!r}, which is not "
                                      f"installed ({exc}); install it (pip install {spec.pip_name}) or use "
                                      "attention 'sdpa'") from exc
    kernel = _resolved[name] = spec.make(module)
    return kernel


def attention_available(name: str) -> bool:
    """True when `name` resolves (its package imports); never raises."""
    try:
        resolve_attention(name)
    except InputError:
        return False
    return True
