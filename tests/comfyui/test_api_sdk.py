"""Real-ComfyUI tier: the official `wavespeed` SDK, unmodified but its base URL, uploads media with its
upload helper and runs a job end to end on ComfyUI with tiny models; skipped unless COMFYUI_DIR is set.

No fetch host is admitted (`INFINITETALK_API_ALLOW_HOSTS` unset): the uploaded files' download URLs
point at the server itself on 127.0.0.1 and must resolve to the upload folder, never over HTTP.

Run: COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python pytest tests/comfyui/test_api_sdk.py
"""
from __future__ import annotations

import urllib.request
import wave
from urllib.parse import urlsplit

import numpy as np
import pytest

from comfy_server import COMFYUI_DIR, spawn_server, stop_server, tiny_api_workflows

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no ComfyUI source tree)")]
KEY = "sdk-test-key-51e0"


def _wav(path, samples: int, freq: float, rate: int = 16000) -> None:
    pcm = (8000 * np.sin(2 * np.pi * freq * np.arange(samples) / rate)).astype("<i2").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


def test_wavespeed_sdk_upload_and_run(tiny_models, tmp_path, custom_node_package):
    wavespeed = pytest.importorskip("wavespeed")
    media = tmp_path / "client"
    media.mkdir()
    rng = np.random.default_rng(0)
    custom_node_package.nodes.media.write_png((rng.random((64, 96, 3)) * 255).astype(np.uint8), media / "two.png")
    _wav(media / "left.wav", 8000, 180.0)
    _wav(media / "right.wav", 4800, 290.0)
    env = {"INFINITETALK_API_WORKFLOWS": str(tiny_api_workflows(tmp_path / "workflows")),
           "INFINITETALK_API_KEYS": KEY, "INFINITETALK_API_ALLOW_HOSTS": ""}
    server = spawn_server(tiny_models, tmp_path / "base", env)
    try:
        client = wavespeed.Client(api_key=KEY, base_url=server.url)
        inputs = {"image": client.upload(str(media / "two.png")), "left_audio": client.upload(str(media / "left.wav")),
                  "right_audio": client.upload(str(media / "right.wav")), "prompt": "two friends talk", "seed": 7}
        assert all(urlsplit(inputs[k]).path.startswith("/infinitetalk/v1/uploads/")
                   for k in ("image", "left_audio", "right_audio"))
        out = client.run("wavespeed-ai/infinitetalk/image-to-video-multi", inputs, timeout=600, poll_interval=1.0)
        [video_url] = out["outputs"]
        assert video_url.startswith(server.url + "/view?")
        with urllib.request.urlopen(video_url, timeout=60) as r:
            data = r.read()
        assert data[4:8] == b"ftyp" and len(data) > 1000   # an MP4 file
        assert server.process.poll() is None
    finally:
        stop_server(server)
