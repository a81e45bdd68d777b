"""The DiT block's float32 islands as functions that can run as one fused kernel each.

Eager, each island is a chain of full-size elementwise kernels (a bf16 run reads and writes float32 copies of
the residual stream several times per block); `enable_fusion()` puts each function behind `torch.compile`, so
the chain becomes one kernel that reads the bf16 input once and writes the result once. The maths is the
reference's either way (same float32/float64 work dtypes, same roundings), only the kernels change; inside a
compiled block (`--compile`) the plain function is traced and fused with its neighbours.

`observe(callback)` lets a benchmark see each island call (benchmarks/census.py models a fused island as one
kernel reading its inputs and writing its output).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F

__all__ = ["Fused", "ISLANDS", "enable_fusion", "fusion_enabled", "observe", "compile_island", "layer_norm",
           "modulated_norm", "gated_residual", "rms_norm", "rms_norm_rope", "rope_video", "rope_1d", "quantize_e4m3",
           "E4M3_MAX", "QUANTIZE_CHUNK"]

log = logging.getLogger(__name__)
_observer: Callable[["Fused", Callable, tuple], Any] | None = None


class Fused:
    """A float32 island: calls `fn`, or its compiled version after `enable_fusion()`."""

    def __init__(self, fn: Callable, eager: Callable | None = None):
        self.fn, self.name, self.compiled = fn, fn.__name__.lstrip("_"), None
        self.eager = eager or fn   # the same maths, kinder to memory where a kernel-per-op would not be
        self.__doc__ = fn.__doc__

    def __call__(self, *args):
        if torch.compiler.is_compiling():  # traced into the caller's graph
            return self.fn(*args)
        run = self.eager if self.compiled is None else self._compiled
        return run(*args) if _observer is None else _observer(self, run, args)

    def _compiled(self, *args):
        try:
            return self.compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a compiler that fails here (no working Triton, ...) costs speed, not the job
            log.warning("fused %s: compiling failed (%s: %s); it runs eager from now on", self.name,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.compiled = None
            return self.eager(*args)


@Fused
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Wan's FP32 LayerNorm: statistics and affine in float32, result rounded to x's dtype."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


@Fused
def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """adaLN: LayerNorm (rounded to x's dtype like the reference), then ·(1+scale)+shift in float32."""
    normed = layer_norm.fn(x, None, None, eps)
    return (normed.float() * (1 + scale) + shift).to(out_dtype)


@Fused
def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y·gate with a float32 gate, rounded to x's dtype."""
    return (x + y * gate).to(x.dtype)


@Fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan RMSNorm: normalise in float32, round to x's dtype, then scale (weight in x's dtype)."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return normed * weight.to(x.dtype)


@Fused
def rope_video(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of `x` `[..., L, heads, d]` by `rotations` `[L, 1, d/2, 2]` (cos, sin).

    Float64 for float32 inputs (reference-exact), float32 otherwise (rounded to bf16/fp16 right after)."""
    work = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    pairs = x.to(work).unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = rotations[..., 0].to(work), rotations[..., 1].to(work)
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(x.dtype)


@Fused
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, rotations: torch.Tensor) -> torch.Tensor:
    """q/k of the self-attention: RMSNorm over the full width `[B, L, dim]`, then the 3-D RoPE per head
    -> `[B, L, heads, d]` (d = 2·rotations.shape[-2])."""
    normed = rms_norm.fn(x, weight, eps)
    return rope_video.fn(normed.unflatten(-1, (-1, 2 * rotations.shape[-2])), rotations)


@Fused
def rope_1d(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """1-D RoPE (base 10000, adjacent pairs) on `x` `[..., d]`, positions broadcast against `x.shape[:-1]`;
    float32 maths like the reference (positions may be fractional: L-RoPE speaker positions)."""
    d = x.shape[-1]
    inv = 1.0 / torch.pow(10000, torch.arange(0, d, 2, dtype=torch.float32, device=x.device)[: d // 2] / d)
    angles = positions.float()[..., None] * inv
    cos, sin = torch.cos(angles), torch.sin(angles)
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * cos - im * sin, im * cos + re * sin], dim=-1).flatten(-2).to(x.dtype)


E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
QUANTIZE_CHUNK = 2**24   # elements of the float32 quotient an eager quantisation holds at once (64 MiB)


def _quantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in float32, saturated at ±448, rounded to float8 e4m3."""
    return (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _quantize_e4m3_chunked(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`_quantize_e4m3` of `[rows, k]` a few rows at a time: no float32 copy of the whole activation."""
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    rows = max(1, QUANTIZE_CHUNK // max(1, x.shape[-1]))
    for start in range(0, x.shape[0], rows):   # one float32 chunk, scaled and clamped in place; the copy rounds
        chunk = x[start:start + rows].to(torch.float32, copy=True)
        out[start:start + rows] = chunk.div_(scale).clamp_(-E4M3_MAX, E4M3_MAX)
    return out


quantize_e4m3 = Fused(_quantize_e4m3, eager=_quantize_e4m3_chunked)


ISLANDS: tuple[Fused, ...] = (layer_norm, modulated_norm, gated_residual, rms_norm, rope_video, rms_norm_rope,
                              rope_1d, quantize_e4m3)


def compile_island(fn: Callable) -> Callable:
    """torch.compile for an island: symbolic sizes (one graph for every token count) and the eager roundings
    kept (`emulate_precision_casts`: a bf16 cast inside the island rounds as it does eager)."""
    return torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})


def enable_fusion(on: bool = True, compiler: Callable[[Callable], Callable] = compile_island) -> None:
    """Run every island compiled (`compiler(fn)`) or, with `on=False`, as the plain eager function."""
    for island in ISLANDS:
        if not on:
            island.compiled = None
        elif island.compiled is None:
            island.compiled = compiler(island.fn)


def fusion_enabled() -> bool:
    return any(island.compiled is not None for island in ISLANDS)


@contextmanager
def observe(callback: Callable[[Fused, Callable, tuple], Any]) -> Iterator[None]:
    """While inside, every island call goes through `callback(island, run, args)` (which must call `run(*args)`
    and return its result)."""
    global _observer
    previous, _observer = _observer, callback
    try:
        yield
    finally:
        _observer = previous
