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
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..models.layers import Linear
from ..ops import fused
from ..ops.attention import auto_kernel_name, resolve_attention
from ..ops.options import RuntimeOptions

__all__ = ["configure_dit", "check_kernels", "KernelReport", "fp8_matmul_supported", "compile_blocks"]

MIN_FP8_CAPABILITY = (8, 9)
log = logging.getLogger(__name__)


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


def _new_graph(fail) -> None:
    log.warning("torch.compile: a new DiT block graph (a guard failed: %s). Expected once per kind of call "
                "(a two-speaker and a one-speaker guidance call unbatched, a new resolution); anything else "
                "recompiles every block until Dynamo's limit, then runs eager", fail.reason)


def compile_blocks(blocks: nn.ModuleList, backend: str | Callable = "inductor") -> int:
    """torch.compile each block's forward in place (hooks stay outside); returns how many were compiled.

    Every block runs the same code, so blocks share their graphs (parameters are graph inputs): one graph per
    kind of call for the whole stack, streamed blocks included. `dynamic=None`: PyTorch re-specialises once
    when the token count changes, then treats it as dynamic. Each new graph after the first is logged with the
    guard that failed (`_new_graph`)."""
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True   # bf16 roundings where the eager code has them
    n = 0
    for block in blocks:
        if getattr(block, "_compiled_forward", False):
            continue
        block.forward = torch._dynamo.optimize(backend, dynamic=None, guard_fail_fn=_new_graph)(block.forward)
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
    # a compiled block calls one kernel: `auto` is resolved here, not per call inside the graph
    dit.attention = auto_kernel_name(device) if options.compile and options.attention == "auto" else options.attention
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
