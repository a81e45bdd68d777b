"""Real-ComfyUI tier: a ComfyUI whose Python cannot import soxr (blocked by a sitecustomize on PYTHONPATH) loads
the pack, logs once which package is missing and how to install it, and the job API answers 503 with that
sentence. Skipped unless COMFYUI_DIR is set."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest

from comfy_server import COMFYUI_DIR, spawn_server, stop_server
from test_dependencies import BLOCKER

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no ComfyUI source tree)")]


def test_comfyui_without_soxr_says_so_once_and_the_api_answers_503(tiny_models, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH", "")]))
    server = spawn_server(tiny_models, tmp_path / "base", {"PYTHONPATH": path, "INFINITETALK_TEST_BLOCK": "soxr",
                                                          "INFINITETALK_API": "1"})
    try:
        nodes = server.get("/object_info")
        assert "InfiniteTalkMultiSampler" in nodes and "InfiniteTalkLoadTwoAudios" in nodes   # still registered
        status, reply = server.post("/infinitetalk/v1/image-to-video-multi", {"image": "x.png"})
        assert status == 503 and "lacks soxr" in reply["message"], reply
        assert "this package's requirements.txt" in reply["message"] and str(tmp_path) not in reply["message"]
        try:
            urllib.request.urlopen(server.url + "/infinitetalk/v1/predictions/x/status", timeout=30)
            raise AssertionError("status answered 200 without soxr")
        except urllib.error.HTTPError as err:
            assert err.code == 503 and "lacks soxr" in json.loads(err.read())["message"]
    finally:
        stop_server(server)
    log = server.log.read_text()
    assert log.count("lacks soxr") == 1, log[-4000:]
    assert "-m pip install -r" in log and "No module named 'soxr'" not in log
