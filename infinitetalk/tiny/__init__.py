"""Random tiny checkpoints in every real file layout, written into a ComfyUI-style models tree.

`python -m infinitetalk make-tiny-models DIR` calls `write(models_dir, seed)` of every module named in
COMPONENTS (each `infinitetalk/tiny/<name>.py`). The tiny components fit together (same text width,
audio layout, image width) so the whole pipeline runs end to end on CPU; the shared sizes live in
`spec.py`.
"""
from __future__ import annotations

import importlib
from pathlib import Path

COMPONENTS = ("dit", "wav2vec2", "t5", "clip_vision", "vae")


def make_tiny_models(models_dir: str | Path, seed: int = 0, components: tuple[str, ...] = COMPONENTS) -> list[Path]:
    """Write every tiny component (all layouts) under `models_dir`; returns the files written."""
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in components:
        module = importlib.import_module(f"{__name__}.{name}")
        written.extend(module.write(root, seed=seed))
    return written
