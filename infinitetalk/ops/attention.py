"""Attention kernels by name: `auto` (default), `sdpa`, `cudnn`, `flash` (flash-attn 2), `fa3` (flash-attn 3,
Hopper), `sage` (SageAttention, int8 QK: lossy), `math`.

A named kernel is used only when asked for; optional packages are imported the first time their backend is
resolved, never at import of this module, and asking for one that is not installed is an InputError naming
the package to install. `auto` picks per device, fastest first (`auto_order`): FA3 when installed on Hopper,
then cuDNN attention (inside PyTorch's SDPA, ≈1.6× FlashAttention-2 on sm90), then plain SDPA; a kernel that
refuses a call's shape (a RuntimeError, e.g. stride-0 batch K/V) hands the call to the next one. Sage is
never picked by `auto` (it changes the maths). Every kernel takes and returns `[batch, heads, tokens, d]`.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import InputError
from .options import ATTENTION_CHOICES

__all__ = ["AttentionKernel", "KERNELS", "resolve_attention", "attention_available", "auto_order",
           "auto_kernel_name"]

log = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_HALF = (torch.float16, torch.bfloat16)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA with cuDNN attention first in its priority list (SDPA falls back where cuDNN's checks refuse)."""
    with sdpa_kernel(_CUDNN_FIRST, set_priority=True):
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
        out = out[0] if isinstance(out, tuple) else out   # FA3 may also return the log-sum-exp
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
    "cudnn": AttentionKernel("cudnn", None, None, lambda _: _cudnn),
    "flash": AttentionKernel("flash", "flash_attn", "flash-attn", _flash),
    "fa3": AttentionKernel("fa3", "flash_attn_interface", "flash-attn 3 (hopper/ of the flash-attention repo)",
                           _flash),
    "sage": AttentionKernel("sage", "sageattention", "sageattention", _sage),
}
_resolved: dict[str, Kernel] = {"sdpa": _sdpa, "math": _math, "cudnn": _cudnn}


def auto_order(device_type: str, capability: tuple[int, int] | None, installed: Callable[[str], bool]
               ) -> tuple[str, ...]:
    """Kernels `auto` tries on a device, fastest first; the last (`sdpa`) takes every shape.

    `capability`: the CUDA compute capability (None off CUDA); `installed(name)`: whether a backend's package
    imports. Pure, so the choice is testable without the device."""
    if device_type != "cuda" or capability is None:
        return ("sdpa",)
    order = []
    if (9, 0) <= capability < (10, 0) and installed("fa3"):
        order.append("fa3")
    if capability >= (9, 0):
        order.append("cudnn")
    return (*order, "sdpa")


_orders: dict[torch.device, tuple[str, ...]] = {}
_refused: set[tuple[str, tuple]] = set()   # (kernel, shape key): shapes a kernel refused


def _usable(name: str) -> bool:
    """`auto` only: the backend's package is installed and imports (a broken binary build is skipped, not fatal)."""
    package = KERNELS[name].package
    try:
        if package is not None and package not in sys.modules and importlib.util.find_spec(package) is None:
            return False
        resolve_attention(name)
    except Exception as exc:  # noqa: BLE001 - an optional package's import may fail any way it likes
        log.warning("attention auto: %s is installed but does not load (%s); not used", name, exc)
        return False
    return True


def _order_for(device: torch.device) -> tuple[str, ...]:
    names = _orders.get(device)
    if names is None:
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        names = _orders[device] = auto_order(device.type, cap, _usable)
        log.info("attention auto on %s: %s", device, " > ".join(names))
    return names


def auto_kernel_name(device: torch.device | str) -> str:
    """The one kernel `auto` stands for inside a compiled graph on `device` (no try/except in a trace):
    the fastest of PyTorch's own."""
    return next(n for n in _order_for(torch.device(device)) if KERNELS[n].package is None)


def _shape_key(q: torch.Tensor, k: torch.Tensor) -> tuple:
    return q.device, q.dtype, tuple(q.shape), tuple(k.shape), k.stride()


def _auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    names = _order_for(q.device)
    shape = _shape_key(q, k)
    for name in names[:-1]:
        if (name, shape) in _refused:   # refused once: not tried again on every block of every step
            continue
        try:
            return resolve_attention(name)(q, k, v)
        except torch.OutOfMemoryError:   # memory, not the shape: no other kernel would change that
            raise
        except RuntimeError as exc:   # this shape is refused: the next kernel takes the call
            _refused.add((name, shape))
            log.warning("attention auto: %s refused q%s k%s (%s); falling back", name, tuple(q.shape),
                        tuple(k.shape), (str(exc).splitlines() or [""])[0][:200])
    return resolve_attention(names[-1])(q, k, v)


KERNELS["auto"] = AttentionKernel("auto", None, None, lambda _: _auto)
_resolved["auto"] = _auto
assert tuple(sorted(KERNELS)) == tuple(sorted(ATTENTION_CHOICES))


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
