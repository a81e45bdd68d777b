"""Real-ComfyUI tier: a ComfyUI whose job-API setting is wrong (an invalid S3 bucket name) still loads the nodes,
logs the bad setting once, and answers every API path (the contract's, WaveSpeed's, RunComfy's) with 503 naming
the setting. Skipped unless COMFYUI_DIR is set."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from comfy_server import COMFYUI_DIR, spawn_server, stop_server

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no ComfyUI source tree)")]


def test_comfyui_with_a_bad_s3_setting_answers_503_naming_it(tiny_models, tmp_path):
    server = spawn_server(tiny_models, tmp_path / "base", {"INFINITETALK_API_S3_BUCKET": "Not_A_Bucket!"})
    try:
        assert "InfiniteTalkMultiSampler" in server.get("/object_info")          # the nodes load regardless
        for path in ("/infinitetalk/v1/image-to-video-multi", "/api/v3/wavespeed-ai/infinitetalk/image-to-video-multi",
                     "/v1/models/community/infinite-talk/fast/multi"):
            status, reply = server.post(path, {"image": "x.png"})
            message = reply.get("message") or reply.get("error")
            assert status == 503 and "INFINITETALK_API_S3_BUCKET" in message, (path, reply)
            assert "Not_A_Bucket!" not in message
        for path, field in (("/v1/requests/abc/status", "error"), ("/infinitetalk/v1/health", "message")):
            try:
                urllib.request.urlopen(server.url + path, timeout=30)
                raise AssertionError(f"{path} answered 200 with a bad setting")
            except urllib.error.HTTPError as err:
                reply = json.loads(err.read())
                assert err.code == 503 and reply["code"] == 503 and "INFINITETALK_API_S3_BUCKET" in reply[field]
    finally:
        stop_server(server)
    log = server.log.read_text()
    assert log.count("InfiniteTalk job API not started") == 1 and "Not_A_Bucket!" in log, log[-4000:]
    assert "could not be registered" not in log                               # no traceback page
