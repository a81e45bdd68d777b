"""Shared fixtures: golden cases, tiny models tree, the package imported as ComfyUI would."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOLDEN = Path(os.environ.get("INFINITETALK_GOLDEN", ROOT.parent / "shared" / "golden"))


def golden_cases(*kinds: str) -> list[Path]:
    """Golden case folders of the given component kinds (all kinds when none given)."""
    import json

    if not GOLDEN.is_dir():
        return []
    out = []
    for d in sorted(GOLDEN.iterdir()):
        spec = d / "case.json"
        if spec.is_file() and (not kinds or json.loads(spec.read_text())["component"] in kinds):
            out.append(d)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A ComfyUI-style models folder with every tiny component in every layout (written once per session)."""
    from infinitetalk.tiny import make_tiny_models

    root = tmp_path_factory.mktemp("models")
    make_tiny_models(root, seed=0)
    return root


@pytest.fixture(scope="session")
def custom_node_package():
    """The repository imported as a ComfyUI custom-node package (relative imports intact)."""
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder.import_package()
