"""Lazy renamed view of checkpoint tensors, for files whose naming scheme differs from the module's.

Values are produced on access (renamed, reshaped or concatenated from the stored tensors), so a
loader can hand a foreign-named multi-GB file to `load_module` without materialising it twice.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

__all__ = ["TensorMap"]


class TensorMap(Mapping[str, torch.Tensor]):
    """name -> tensor, each value computed by its getter when read; shapes known without reading."""

    def __init__(self) -> None:
        self._getters: dict[str, Callable[[], torch.Tensor]] = {}
        self._shapes: dict[str, torch.Size] = {}

    def add(self, name: str, shape: torch.Size | tuple[int, ...], getter: Callable[[], torch.Tensor]) -> None:
        self._getters[name] = getter
        self._shapes[name] = torch.Size(shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._getters[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._getters)

    def __len__(self) -> int:
        return len(self._getters)

    def __contains__(self, name: object) -> bool:
        return name in self._getters

    def shape(self, name: str) -> torch.Size:
        return self._shapes[name]
