"""The read-only, lazily read `name -> tensor` mapping that every checkpoint view is built on.

A checkpoint, its canonical view, a renamed view and a LoRA-merged view all hold an index (name ->
where the tensor comes from) and produce a tensor only when it is read, so a multi-GB file is never
materialised twice. `shape`/`dtype` answer without reading data wherever the source knows them.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["LazyTensors", "shape_of", "dtype_of", "packed_type_of"]


class LazyTensors(Mapping[str, torch.Tensor]):
    """Names are the keys of `_index`; `_load(name, _index[name])` produces the tensor on read.

    Subclasses implement `_load`, and override `shape`/`dtype` when they can answer from headers
    (the defaults read the tensor).
    """

    def __init__(self, index: Mapping[str, Any]) -> None:
        self._index = index

    def _load(self, key: str, entry: Any) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._load(key, self._index[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def shape(self, key: str) -> torch.Size:
        return self[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self[key].dtype

    def packed_type(self, key: str) -> int | None:
        """GGML quantisation type when `key` is stored as GGUF blocks, else None. Reading such a key gives
        the dequantised float tensor; `packed(key)` gives the raw uint8 blocks `[rows, bytes per row]`."""
        return None

    def packed(self, key: str) -> torch.Tensor:
        raise KeyError(f"{key!r} is not a packed (GGUF-quantised) tensor")


def shape_of(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Size:
    """Shape of `tensors[key]`, from the header when the mapping can tell (any mapping, plain dicts too)."""
    getter = getattr(tensors, "shape", None)
    return getter(key) if callable(getter) else tensors[key].shape


def dtype_of(tensors: Mapping[str, torch.Tensor], key: str) -> torch.dtype:
    """Dtype of `tensors[key]`, from the header when the mapping can tell."""
    getter = getattr(tensors, "dtype", None)
    return getter(key) if callable(getter) else tensors[key].dtype


def packed_type_of(tensors: Mapping[str, torch.Tensor], key: str) -> int | None:
    """GGML type of a GGUF-packed `tensors[key]`, None for ordinary tensors and plain mappings."""
    getter = getattr(tensors, "packed_type", None)
    return getter(key) if callable(getter) else None
