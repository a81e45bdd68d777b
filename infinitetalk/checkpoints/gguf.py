"""GGUF checkpoints: the quantised Wan / InfiniteTalk files of city96's ComfyUI-GGUF and the wrapper's users.

`open_gguf(path)` gives the same lazy `Checkpoint` as every other format (names, shapes from the
header, `infinitetalk.*`/`general.*` metadata). Reading a quantised tensor gives it dequantised to
float32; `packed(key)` gives its raw GGML blocks (uint8 `[rows, bytes per row]`) and `packed_type(key)`
their type, so `load_module` keeps Linear weights packed (`layers.Linear` dequantises per call with
`ops.quants.dequantize_blocks`, like fp8). Shapes follow ComfyUI-GGUF: GGML dims reversed, and a
`comfy.gguf.orig_shape.<name>` array restores tensors stored reshaped (5-D convs, rows not a multiple
of the block size). The format is parsed by the `gguf` package; dequantisation is PyTorch (`ops.quants`) so it
runs on the GPU. Registers itself as the reader's opener of GGUF files (`reader.register_opener`).

Supported types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K (what Q8_0, Q6_K,
Q5_K_M and Q4_K_M files hold); any other type is refused naming the tensor and the type.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..ops.quants import PLAIN_TYPES, QUANT_BLOCKS, QUANT_NAMES, dequantize_blocks, quant_name
from ..errors import CheckpointError
from .reader import Checkpoint, register_opener

__all__ = ["GGUF_MAGIC", "GGUFCheckpoint", "open_gguf"]

GGUF_MAGIC = b"GGUF"
_ORIG_SHAPE = "comfy.gguf.orig_shape."


# ----------------------------------------------------------------------------- reading
class GGUFCheckpoint(Checkpoint):
    """A Checkpoint over a GGUF file; quantised tensors read dequantised, `packed()` gives their blocks."""

    def __init__(self, path: Path, entries: dict, metadata: dict[str, str], qtypes: dict[str, int]):
        super().__init__(path, entries, self._read, metadata)
        self.qtypes = qtypes  # quantised tensors only: name -> GGML type

    def _raw(self, key: str) -> torch.Tensor:
        tensor = self._index[key][2]
        return torch.from_numpy(np.array(tensor.data, copy=True)).contiguous()  # own memory, not the mmap

    def _read(self, key: str, tensor) -> torch.Tensor:
        shape = self.shape(key)
        qtype = self.qtypes.get(key)
        if qtype is not None:
            return dequantize_blocks(self._raw(key).view(torch.uint8), qtype, shape)
        return self._raw(key).view(self.dtype(key)).reshape(shape)

    def packed_type(self, key: str) -> int | None:
        return self.qtypes.get(key)

    def packed(self, key: str) -> torch.Tensor:
        if key not in self.qtypes:
            raise KeyError(f"{key!r} is not a quantised tensor of {self.path}")
        return self._raw(key).view(torch.uint8)


def _orig_shape(field) -> tuple[int, ...]:
    return tuple(int(v) for v in field.contents())


def open_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a GGUF file for lazy reading; unsupported tensor types and corrupt headers raise CheckpointError."""
    path = Path(path)
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a dependency
        raise CheckpointError(path, "reading GGUF files needs the 'gguf' package (pip install gguf)") from exc
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt / truncated / foreign file
        raise CheckpointError(path, f"not a readable GGUF file (truncated or corrupt?): {type(exc).__name__}: {exc}") from exc
    metadata: dict[str, str] = {}
    orig_shapes: dict[str, tuple[int, ...]] = {}
    for name, field in reader.fields.items():
        if name.startswith(_ORIG_SHAPE):
            orig_shapes[name[len(_ORIG_SHAPE):]] = _orig_shape(field)
        elif name.startswith(("infinitetalk.", "general.")) and len(field.types) == 1:
            value = field.contents()
            metadata[name] = value if isinstance(value, str) else str(value)
    entries: dict[str, tuple[torch.Size, torch.dtype, object]] = {}
    qtypes: dict[str, int] = {}
    for t in reader.tensors:
        qtype = int(t.tensor_type)
        stored = tuple(int(d) for d in reversed(list(t.shape)))
        shape = torch.Size(orig_shapes.get(t.name, stored))
        if shape.numel() != int(t.n_elements):
            raise CheckpointError(path, f"tensor {t.name!r}: original shape {tuple(shape)} does not hold its "
                                        f"{int(t.n_elements)} elements")
        if qtype in PLAIN_TYPES:
            entries[t.name] = (shape, PLAIN_TYPES[qtype], t)
        elif qtype in QUANT_BLOCKS:
            entries[t.name] = (shape, torch.float32, t)
            qtypes[t.name] = qtype
        else:
            supported = ", ".join(QUANT_NAMES[q] for q in sorted(QUANT_NAMES))
            raise CheckpointError(path, f"tensor {t.name!r} is stored as {quant_name(qtype)}, which is not supported "
                                        f"(supported: {supported}); use a Q8_0, Q6_K, Q5_K_M or Q4_K_M file")
    return GGUFCheckpoint(path, entries, metadata, qtypes)


register_opener("gguf", open_gguf)
