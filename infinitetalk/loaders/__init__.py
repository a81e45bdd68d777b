"""File(s) -> ready module, one module per component. Exports are resolved lazily so importing one
loader never imports the others' model code."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_dit": "dit",
    "load_wav2vec2": "wav2vec2",
    "load_text_encoder": "t5",
    "load_clip_vision": "clip_vision",
    "load_vae": "vae",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
