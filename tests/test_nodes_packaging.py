"""Packaging: Comfy Registry metadata in pyproject.toml, requirements.txt mirroring the runtime deps."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_registry_metadata_is_complete():
    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"][0].isalpha() and "comfyui" not in project["name"].lower()
    assert project["version"].count(".") == 2 and all(p.isdigit() for p in project["version"].split("."))
    for key in ("PublisherId", "DisplayName", "includes", "requires-comfyui"):
        assert comfy.get(key) not in (None, ""), key
    # links shown by the registry: real ones or none (no placeholder repository)
    links = list(project.get("urls", {}).values()) + ([comfy["Icon"]] if "Icon" in comfy else [])
    for url in links:
        assert url.startswith("https://") and "infinitetalk-multi/infinitetalk-multi" not in url, url
    assert (ROOT / "web" / "icon.svg").is_file()
    for path in comfy["includes"]:
        assert (ROOT / path).exists(), path
    # the frontend is an extra (the browser tests need it), never pulled by `pip install .` for the CLI
    assert not any(d.startswith("comfyui-frontend-package") for d in project["dependencies"])
    assert any(d.startswith("comfyui-frontend-package") for d in project["optional-dependencies"]["frontend"])


def test_requirements_mirror_the_runtime_dependencies():
    deps = _pyproject()["project"]["dependencies"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [line for line in lines if line and not line.startswith("#")]
    assert reqs == deps


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]  # SPDX form
