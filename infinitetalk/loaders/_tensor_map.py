"""Lazy renamed view of checkpoint tensors, for files whose naming scheme differs from the module's.

Values are produced on access (renamed, reshaped or concatenated from the stored tensors), so a
loader can hand a foreign-named multi-GB file to `load_module` without materialising it twice.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..checkpoints.lazy import LazyTensors

__all__ = ["TensorMap"]

_Entry = tuple[torch.Size, Callable[[], torch.Tensor]]


class TensorMap(LazyTensors):
    """name -> tensor, each value computed by its getter when read; shapes known without reading."""

    def __init__(self) -> None:
        super().__init__({})

    def add(self, name: str, shape: torch.Size | tuple[int, ...], getter: Callable[[], torch.Tensor]) -> None:
        self._index[name] = (torch.Size(shape), getter)

    def _load(self, name: str, entry: _Entry) -> torch.Tensor:
        return entry[1]()

    def shape(self, name: str) -> torch.Size:
        return self._index[name][0]
