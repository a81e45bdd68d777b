"""GGML block formats in PyTorch: the type tables and `dequantize_blocks`, so GGUF weights dequantise on the
GPU. A kernel: `models.layers.Linear` calls it per forward on packed weights, and `checkpoints.gguf` when a
quantised tensor is read whole. Parsing the file is `checkpoints.gguf`'s job (with the `gguf` package)."""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["QUANT_BLOCKS", "PLAIN_TYPES", "QUANT_NAMES", "dequantize_blocks", "packed_nbytes", "quant_name"]

# GGML type id -> (elements per block, bytes per block); ids are the GGML enum's
_F32, _F16, _Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _Q4_K, _Q5_K, _Q6_K, _BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
QUANT_BLOCKS: dict[int, tuple[int, int]] = {
    _Q4_0: (32, 18), _Q4_1: (32, 20), _Q5_0: (32, 22), _Q5_1: (32, 24), _Q8_0: (32, 34),
    _Q4_K: (256, 144), _Q5_K: (256, 176), _Q6_K: (256, 210),
}
PLAIN_TYPES = {_F32: torch.float32, _F16: torch.float16, _BF16: torch.bfloat16}
QUANT_NAMES = {_F32: "F32", _F16: "F16", _BF16: "BF16", _Q4_0: "Q4_0", _Q4_1: "Q4_1", _Q5_0: "Q5_0", _Q5_1: "Q5_1",
          _Q8_0: "Q8_0", _Q4_K: "Q4_K", _Q5_K: "Q5_K", _Q6_K: "Q6_K"}


def quant_name(qtype: int) -> str:
    """GGML type name (e.g. "Q4_K") of a type id."""
    try:
        import gguf

        return gguf.GGMLQuantizationType(qtype).name
    except (ImportError, ValueError):
        return QUANT_NAMES.get(qtype, f"type {qtype}")


# ----------------------------------------------------------------------------- dequantisation (torch)
def _f16(b: torch.Tensor) -> torch.Tensor:
    """`[n, 2]` uint8 little-endian halves -> `[n, 1]` float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """`[n, k]` bytes -> `[n, 2, k]` (low nibbles, high nibbles)."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=1)


def _bits(b: torch.Tensor, n_bits: int) -> torch.Tensor:
    """`[n, k]` bytes -> `[n, n_bits, k]`: bit i of every byte at index i."""
    shifts = torch.arange(n_bits, device=b.device, dtype=torch.uint8).view(1, -1, 1)
    return (b.unsqueeze(1) >> shifts) & 1


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_legacy(b: torch.Tensor, with_min: bool) -> torch.Tensor:
    d = _f16(b[:, :2])
    off = 4 if with_min else 2
    q = _nibbles(b[:, off:]).reshape(b.shape[0], 32).float()  # elements 0-15 low nibbles, 16-31 high
    return d * q + _f16(b[:, 2:4]) if with_min else d * (q - 8)


def _q5_legacy(b: torch.Tensor, with_min: bool) -> torch.Tensor:
    d = _f16(b[:, :2])
    off = 4 if with_min else 2
    high = _bits(b[:, off:off + 4], 8).transpose(1, 2).reshape(b.shape[0], 32)  # bit j of the LE uint32 -> element j
    q = (_nibbles(b[:, off + 4:]).reshape(b.shape[0], 32) | (high << 4)).float()
    return d * q + _f16(b[:, 2:4]) if with_min else d * (q - 16)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)), dim=1)
    mn = torch.cat((mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)), dim=1)
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).transpose(1, 2).reshape(n, 8, 32).float()  # chunk c -> groups 2c, 2c+1
    return (_f16(b[:, :2]).unsqueeze(-1) * sc.unsqueeze(-1) * q - _f16(b[:, 2:4]).unsqueeze(-1) * mn.unsqueeze(-1)
            ).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    low = _nibbles(b[:, 48:].reshape(n, 4, 32)).transpose(1, 2).reshape(n, 8, 32)
    q = (low | (_bits(b[:, 16:48], 8) << 4)).float()  # bit i of qh[pos] -> group i
    return (_f16(b[:, :2]).unsqueeze(-1) * sc.unsqueeze(-1) * q - _f16(b[:, 2:4]).unsqueeze(-1) * mn.unsqueeze(-1)
            ).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 64)
    low = torch.stack((ql & 0x0F, ql >> 4), dim=2).reshape(n, 8, 32)  # (half, nibble, byte) -> group
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)  # 0, 2, 4, 6: no host copy
    high = ((qh >> shifts) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).float().reshape(n, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return (_f16(b[:, 208:210]).unsqueeze(-1) * scales.unsqueeze(-1) * q).reshape(n, 256)


_DEQUANT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    _Q8_0: _q8_0, _Q4_0: lambda b: _q4_legacy(b, False), _Q4_1: lambda b: _q4_legacy(b, True),
    _Q5_0: lambda b: _q5_legacy(b, False), _Q5_1: lambda b: _q5_legacy(b, True),
    _Q4_K: _q4_k, _Q5_K: _q5_k, _Q6_K: _q6_k,
}


def packed_nbytes(shape: tuple[int, ...] | torch.Size, qtype: int) -> int:
    """Bytes a tensor of `shape` takes as GGML blocks of `qtype` (what a packed Linear weight holds in memory)."""
    block, size = QUANT_BLOCKS[qtype]
    return -(-torch.Size(shape).numel() // block) * size


def dequantize_blocks(packed: torch.Tensor, qtype: int, shape: tuple[int, ...] | torch.Size,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGML blocks (uint8, any shape holding whole blocks, row-major) -> a `shape` tensor of `dtype`."""
    block, size = QUANT_BLOCKS[qtype]
    blocks = packed.reshape(-1, size)
    return _DEQUANT[qtype](blocks).reshape(shape).to(dtype)


