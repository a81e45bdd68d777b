"""Shared fixtures: golden cases, tiny models tree, the package imported as ComfyUI would."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# the library and the test helpers, importable in every import mode and from any folder name
for _path in (ROOT, TESTS, TESTS / "comfyui"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

GOLDEN_ENV = "INFINITETALK_GOLDEN_DIR"
GOLDEN = Path(os.environ[GOLDEN_ENV]) if os.environ.get(GOLDEN_ENV) else None
GOLDEN_MISSING = (f"golden cases not found: set {GOLDEN_ENV} to the golden cases folder" if GOLDEN is None
                  else f"golden cases not found: {GOLDEN_ENV}={GOLDEN} is not a folder")


def golden_cases(*kinds: str) -> list:
    """Golden case folders of the given component kinds (all kinds when none given); without the folder, one
    skipped parameter whose reason names the variable to set."""
    import json

    if GOLDEN is None or not GOLDEN.is_dir():
        return [pytest.param(None, id="no-golden-cases", marks=pytest.mark.skip(reason=GOLDEN_MISSING))]
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


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL for the session (skips without the binaries; fails instead when CI=true)."""
    from pg_support import PostgresServer, require_postgres

    server = PostgresServer(require_postgres())
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture()
def postgres_url(postgres_server):
    """A running server with empty job tables (restarted first if a test stopped it)."""
    if postgres_server.proc is None:
        postgres_server.start()
    postgres_server.reset()
    return postgres_server.url
