"""Lazy, validating access to checkpoint files as users have them on disk.

Every loader goes through :func:`open_checkpoint`, so all formats get the same checks: a truncated
safetensors file, a header that lies (shapes that are not lists of non-negative ints, offsets outside
the data or before it, byte counts that do not match shape × dtype), a pickle posing as safetensors, or a
`.pth` that needs arbitrary unpickling is refused with a CheckpointError naming the file, before any
tensor is materialised. Safetensors headers are also validated by the safetensors library (`safe_open`).

Supported containers:
- `.safetensors` (single file; tensors read one at a time with plain file reads into their own memory),
- sharded safetensors with a `*.safetensors.index.json` (`weight_map`), given the index or its folder,
- `.gguf` files (GGUF magic; see `checkpoints.gguf`: quantised tensors can stay packed),
- `.pth`/`.pt`/`.bin` torch files, read with `torch.load(weights_only=True, mmap=True)`; a dict wrapped
  in `state_dict` / `model` / `module` is unwrapped.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .lazy import LazyTensors

__all__ = ["Checkpoint", "open_checkpoint", "join_shards", "register_opener"]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Storage types of quantised formats: readable, so that the layout check can name the format it refuses.
for _name, _attr in (("F8_E8M0", "float8_e8m0fnu"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


class Checkpoint(LazyTensors):
    """A read-only mapping name -> tensor whose tensors are loaded on access.

    `shape(key)` and `dtype(key)` answer from the header without reading data, so formats and
    configs can be recognised from a multi-GB file in milliseconds.
    """

    def __init__(self, path: Path, entries: dict[str, tuple[torch.Size, torch.dtype, object]],
                 loader: Callable[[str, Any], torch.Tensor], metadata: dict[str, str]):
        super().__init__(entries)  # key -> (shape, dtype, locator)
        self.path = path
        self._loader = loader
        self.metadata = metadata

    def _load(self, key: str, entry: tuple[torch.Size, torch.dtype, object]) -> torch.Tensor:
        return self._loader(key, entry[2])

    def shape(self, key: str) -> torch.Size:
        return self._index[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._index[key][1]

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"


_OPENERS: dict[str, Callable[[Path], Checkpoint]] = {}


def register_opener(kind: str, opener: Callable[[Path], Checkpoint]) -> None:
    """Let a format module that sits on top of this one (`checkpoints.gguf`, imported by the package's
    `__init__`) open the files `_sniff` recognises as `kind`, so the reader never imports it back."""
    _OPENERS[kind] = opener


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise CheckpointError(path, "file is empty or truncated (fewer than 8 bytes)")
    if head[:4] == b"GGUF":
        return "gguf"
    (n,) = struct.unpack("<Q", head[:8])
    if n > 0 and head[8:9] == b"{":  # before the pickle test: a header length like 0x0280 starts with 80 02
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch_zip"
    if head[0] == 0x80 and head[1] in range(2, 6):
        return "pickle"
    if head.lstrip()[:1] == b"{":
        return "json"
    raise CheckpointError(path, "not a safetensors, torch (.pth) or index.json checkpoint (unrecognised header)")


_MAX_HEADER_BYTES = 100 * 1024 * 1024   # safetensors' own limit on the JSON header


def _entry(path: Path, key: str, info: object, data_len: int) -> tuple[list[int], str, int, int]:
    """(shape, dtype name, begin, end) of one header entry, after checking that the header tells the truth:
    shape a list of non-negative ints, a known dtype, offsets ints inside the data, and a byte count equal to
    elements × dtype size (exact integer arithmetic: no overflow)."""
    if not isinstance(info, dict):
        raise CheckpointError(path, f"safetensors entry {key!r} is not an object: corrupt header")
    shape, dtype, offsets = info.get("shape"), info.get("dtype"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**62 for d in shape):
        raise CheckpointError(path, f"tensor {key!r} has shape {shape!r}; expected a list of non-negative integers "
                                    f"(each below 2**62)")
    if dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(path, f"tensor {key!r} has unsupported dtype {dtype!r} (supported: "
                                    f"{', '.join(_SAFETENSORS_DTYPES)})")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(path, f"tensor {key!r} has data_offsets {offsets!r}; expected [begin, end] with "
                                    f"0 <= begin <= end")
    begin, end = offsets
    if end > data_len:
        raise CheckpointError(path, f"truncated: tensor {key!r} needs data bytes up to {end} but the file holds "
                                    f"{data_len} (incomplete download?)")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = _SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != numel * itemsize:
        raise CheckpointError(path, f"tensor {key!r}: {end - begin} data bytes for shape {tuple(shape)} {dtype} "
                                    f"(expected {numel * itemsize})")
    return shape, dtype, begin, end


def _read_safetensors_header(path: Path) -> tuple[dict[str, tuple[list[int], str, int, int]], dict, int]:
    """(validated entries, metadata, data start). Our checks give errors that say what is wrong; then the
    safetensors library (`safe_open`, what ComfyUI uses) validates the rest (e.g. overlapping tensors)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(path, f"safetensors header length {n} exceeds the file size {size}: truncated or corrupt")
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(path, f"safetensors header length {n} is over the {_MAX_HEADER_BYTES} bytes the "
                                        f"format allows: corrupt file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(path, f"safetensors header is not valid JSON ({exc}): corrupt file") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "safetensors header is not a JSON object: corrupt file")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "safetensors __metadata__ is not an object: corrupt file")
    entries = {key: _entry(path, key, info, size - 8 - n) for key, info in header.items()}
    try:
        with safe_open(str(path), framework="pt") as checked:
            checked.keys()
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: the library refuses the header
        raise CheckpointError(path, f"safetensors header refused by the safetensors library: {exc}") from None
    return entries, {str(k): str(v) for k, v in metadata.items()}, 8 + n


def _read_into(path: Path, offset: int, out: torch.Tensor) -> None:
    """Fill the uint8 tensor `out` with the bytes of `path` starting at `offset` (short reads looped)."""
    view = memoryview(out.numpy()).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(path, f"unexpected end of file at byte {offset + done} (file changed or truncated)")
            done += got


def _open_safetensors(path: Path) -> Checkpoint:
    """Tensors are read with plain file reads into fresh memory, not memory-mapped: the loaded model
    owns its memory (no dependency on the file staying in place, no file pages counted twice while
    converting dtypes), and peak memory is the model plus one tensor in flight."""
    header, metadata, data_start = _read_safetensors_header(path)
    entries = {key: (torch.Size(shape), _SAFETENSORS_DTYPES[dtype], data_start + begin)
               for key, (shape, dtype, begin, _) in header.items()}

    def load(key: str, offset: int) -> torch.Tensor:
        shape, dtype, _ = entries[key]
        raw = torch.empty(shape.numel() * dtype.itemsize, dtype=torch.uint8)
        _read_into(path, offset, raw)
        return raw.view(dtype).reshape(shape)

    return Checkpoint(path, entries, load, metadata)


def _open_index(path: Path) -> Checkpoint:
    try:
        index = json.loads(path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(path, f"not a sharded-checkpoint index (expected a JSON object with 'weight_map'): {exc}") from exc
    shards: dict[str, Checkpoint] = {}
    owner: dict[str, Checkpoint] = {}
    metadata: dict[str, str] = dict(index.get("metadata") or {})
    for key, shard_name in weight_map.items():
        shard_path = path.parent / shard_name
        if shard_name not in shards:
            if not shard_path.is_file():
                raise CheckpointError(path, f"shard {shard_name!r} listed in the index is missing")
            shards[shard_name] = _open_safetensors(shard_path)
        shard = shards[shard_name]
        if key not in shard:
            raise CheckpointError(shard_path, f"tensor {key!r} listed in the index is not in this shard")
        owner[key] = shard
    for shard in shards.values():  # shard metadata fills in what the index does not say
        for k, v in shard.metadata.items():
            metadata.setdefault(k, v)
    return join_shards(path, owner, metadata)


def join_shards(path: Path, owner: Mapping[str, Checkpoint], metadata: dict[str, str]) -> Checkpoint:
    """One checkpoint named `path` over tensors spread across shards (`owner`: key -> its shard)."""
    entries = {key: (shard.shape(key), shard.dtype(key), shard) for key, shard in owner.items()}
    return Checkpoint(path, entries, lambda key, shard: shard[key], metadata)


def _open_torch(path: Path, kind: str) -> Checkpoint:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=(kind == "torch_zip"))
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a plain tensor file"
        raise CheckpointError(
            path, f"cannot be read as a plain tensor checkpoint (refusing full unpickling): {type(exc).__name__}: {exc}"
        ) from exc
    for _ in range(2):
        if isinstance(obj, dict):
            for wrapper in _WRAPPER_KEYS:
                if isinstance(obj.get(wrapper), dict):
                    obj = obj[wrapper]
                    break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "torch file does not hold a flat name -> tensor state dict")
    entries = {k: (v.shape, v.dtype, v) for k, v in obj.items()}
    return Checkpoint(path, entries, lambda key, t: t, {})


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint file (or a folder holding one sharded set) for lazy, validated reading."""
    p = Path(path)
    if p.is_dir():
        indexes = sorted(p.glob("*.safetensors.index.json"))
        singles = sorted(p.glob("*.safetensors"))
        if len(indexes) == 1:
            p = indexes[0]
        elif len(singles) == 1:
            p = singles[0]
        else:
            raise CheckpointError(p, "folder must hold exactly one *.safetensors.index.json or one *.safetensors file")
    if not p.is_file():
        raise CheckpointError(p, "no such file")
    kind = _sniff(p)
    if kind == "safetensors":
        return _open_safetensors(p)
    if kind == "json":
        return _open_index(p)
    if kind in _OPENERS:
        return _OPENERS[kind](p)
    if p.suffix == ".safetensors":
        raise CheckpointError(p, f"named .safetensors but holds a {kind.replace('_', ' ')} file (mislabelled)")
    return _open_torch(p, kind)
