"""Kernels of a loaded DiT: attention backend, fp8 matmul and torch.compile, from `RuntimeOptions`.

`configure_dit(dit, options, device)` is called once after loading (by `pipeline.models.load_models`);
it changes speed and memory, never the maths beyond the rounding of the kernel chosen:

- attention: the backend by name (`ops.attention`), checked here so a missing package fails
  before any denoising step;
- fp8 matmul: e4m3 Linear weights run through `torch._scaled_mm` (activation quantised per call with a
  per-tensor scale) instead of being dequantised to bf16 per call. `auto` = on CUDA GPUs of compute
  capability >= 8.9 (Ada, Hopper, Blackwell); `on` = also elsewhere PyTorch runs `_scaled_mm` (CPU), an
  error on older GPUs; `off` = always dequantise. Layers whose dims are not multiples of 16 dequantise;
- compile: each transformer block's `forward` is replaced by `torch.compile(forward)`, so hooks on
  the block (block streaming moves weights in a forward pre-hook) still run outside the compiled code;
- fuse: the float32 islands (`ops.fused`) as one compiled kernel each, the cheap half of compile (auto = on
  CUDA with Triton, and not with `compile`, which fuses them inside each block's graph).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..models.layers import Linear
from ..ops import fused
from ..ops.attention import resolve_attention
from ..ops.options import RuntimeOptions

__all__ = ["configure_dit", "check_kernels", "KernelReport", "fp8_matmul_supported", "compile_blocks"]

MIN_FP8_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class KernelReport:
    """What `configure_dit` applied (for logs and the `plan` command)."""

    attention: str
    fp8_matmul_layers: int
    compiled_blocks: int
    fused_islands: bool = False


def fp8_matmul_supported(device: torch.device | str) -> tuple[bool, str]:
    """(usable, why) for `torch._scaled_mm` on `device`."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return False, "this PyTorch has no torch._scaled_mm"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_FP8_CAPABILITY:
            return False, (f"GPU compute capability {cap[0]}.{cap[1]} < "
                           f"{MIN_FP8_CAPABILITY[0]}.{MIN_FP8_CAPABILITY[1]} (fp8 tensor cores: Ada, Hopper or newer)")
        return True, f"GPU compute capability {cap[0]}.{cap[1]}"
    if device.type == "cpu":
        return True, "CPU (PyTorch's reference implementation; slow)"
    return False, f"no fp8 matmul on {device.type}"


def _use_fp8_matmul(mode: str, device: torch.device) -> bool:
    if mode == "off":
        return False
    ok, why = fp8_matmul_supported(device)
    if mode == "auto":
        return ok and device.type == "cuda"
    if not ok:
        raise InputError("fp8_matmul", f"'on' but fp8 matmul is not available: {why}; use 'auto' or 'off'")
    return True


def _use_fusion(options: RuntimeOptions, device: torch.device) -> bool:
    if options.fuse == "off" or options.compile:
        return False
    return options.fuse == "on" or (device.type == "cuda" and importlib.util.find_spec("triton") is not None)


def compile_blocks(blocks: nn.ModuleList, backend: str | Callable = "inductor") -> int:
    """torch.compile each block's forward in place (hooks stay outside); returns how many were compiled.

    `dynamic=None`: PyTorch re-specialises once when the token count changes, then treats it as dynamic."""
    n = 0
    for block in blocks:
        if getattr(block, "_compiled_forward", False):
            continue
        block.forward = torch.compile(block.forward, backend=backend, dynamic=None)
        block._compiled_forward = True
        n += 1
    return n


def check_kernels(options: RuntimeOptions, device: torch.device | str) -> bool:
    """InputError for choices this machine cannot run (a backend whose package is missing, fp8 'on' where
    unavailable), so a loader can refuse them before reading any weights; returns whether fp8 matmul is used."""
    resolve_attention(options.attention)
    return _use_fp8_matmul(options.fp8_matmul, torch.device(device))


def configure_dit(dit: nn.Module, options: RuntimeOptions, device: torch.device | str,
                  compile_backend: str | Callable = "inductor") -> KernelReport:
    """Apply `options`' attention backend, fp8-matmul mode and compile flag to a loaded DiT.

    Bad choices raise InputError (`check_kernels`). `compile_backend` exists for tests (e.g. "eager" on
    machines without a compiler).
    """
    use_fp8 = check_kernels(options, device)
    dit.attention = options.attention
    n_fp8 = 0
    for module in dit.modules():
        if isinstance(module, Linear):
            module.fp8_matmul = use_fp8 and module.weight.dtype == torch.float8_e4m3fn
            module.fp8_fast_accum = module.fp8_matmul and options.fp8_fast_accum
            n_fp8 += module.fp8_matmul
    compiled = compile_blocks(dit.blocks, compile_backend) if options.compile else 0
    fuse = _use_fusion(options, torch.device(device))
    fused.enable_fusion(fuse)
    return KernelReport(options.attention, n_fp8, compiled, fuse)
