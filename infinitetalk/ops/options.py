"""How a job runs on its hardware: one object shared by the CLI, the ComfyUI loader node and the Python API.

Everything here changes speed and memory, never the maths (within the dtype's rounding)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InputError

__all__ = ["RuntimeOptions", "ATTENTION_CHOICES", "FP8_MATMUL_CHOICES", "FUSE_CHOICES"]

ATTENTION_CHOICES = ("auto", "sdpa", "cudnn", "flash", "fa3", "sage", "math")
FP8_MATMUL_CHOICES = ("auto", "on", "off")
FUSE_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class RuntimeOptions:
    """`vram_gb`: GPU memory the job may use (None or 0 = free memory of the device minus a margin);
    `attention`: attention kernel by name (auto = the fastest exact one on the device); `fp8_matmul`:
    `torch._scaled_mm` for fp8 weights (off by default, the faithful path; auto = where the GPU supports it);
    `compile`: torch.compile the transformer blocks;
    `batch_guidance`: run a step's 2–3 guidance calls as one batch when the budget allows; `fp8_fast_accum`:
    `_scaled_mm`'s fast fp8 accumulation (Hopper; faster, less exact); `fuse`: the DiT's float32 islands as
    compiled kernels (`ops.fused`; auto = on CUDA with Triton, unless `compile` already compiles whole blocks)."""

    vram_gb: float | None = None
    attention: str = "auto"
    fp8_matmul: str = "off"   # opt-in like ComfyUI's --fast: activation rounding adds error
    compile: bool = False
    batch_guidance: bool = True
    fp8_fast_accum: bool = False
    fuse: str = "auto"

    def __post_init__(self) -> None:
        if self.vram_gb is not None and not (self.vram_gb >= 0):
            raise InputError("vram", f"{self.vram_gb} must be a number of GB >= 0 (0 = automatic)")
        if self.attention not in ATTENTION_CHOICES:
            raise InputError("attention", f"{self.attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
        if self.fp8_matmul not in FP8_MATMUL_CHOICES:
            raise InputError("fp8_matmul", f"{self.fp8_matmul!r} is not one of {', '.join(FP8_MATMUL_CHOICES)}")
        if self.fuse not in FUSE_CHOICES:
            raise InputError("fuse", f"{self.fuse!r} is not one of {', '.join(FUSE_CHOICES)}")

    @property
    def budget_bytes(self) -> int | None:
        """The explicit budget in bytes, None when automatic."""
        return None if not self.vram_gb else int(self.vram_gb * 2**30)

    def to_dict(self) -> dict:
        return asdict(self)
