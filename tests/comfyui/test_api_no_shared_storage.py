"""Real-ComfyUI tier: a fleet that shares no folder at all, only a PostgreSQL job store and an S3 bucket
(moto's server, on 127.0.0.1): the wavespeed SDK uploads the picture through an API-only ComfyUI (straight into
the bucket), that server takes the submission (the upload's URL and data: URIs) and stages the inputs in the
bucket, a second ComfyUI with its own input and output folders runs the job from the staged copies and
uploads the video, and the result's presigned URL serves it. Skipped unless COMFYUI_DIR is set."""
from __future__ import annotations

import base64
import io
import time
import urllib.request
import wave

import numpy as np
import pytest

from comfy_server import COMFYUI_DIR, spawn_server, stop_server, tiny_api_workflows
from edge_support import CREDS, MotoServer

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no ComfyUI source tree)")]
BUCKET = "fleet-no-nfs"


def _wav_uri(seconds: float, freq: float, rate: int = 16000) -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((8000 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype("<i2").tobytes())
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_fleet_sharing_only_the_database_and_a_bucket(tiny_models, tmp_path, postgres_url, custom_node_package):
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    s3 = MotoServer(tmp_path / "moto.log")
    try:
        boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        png = tmp_path / "two.png"
        custom_node_package.nodes.media.write_png((np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8), png)
        env = {**CREDS, "INFINITETALK_API_WORKFLOWS": str(tiny_api_workflows(tmp_path / "workflows")),
               "INFINITETALK_API_DATABASE_URL": postgres_url, "INFINITETALK_API_S3_BUCKET": BUCKET,
               "INFINITETALK_API_S3_ENDPOINT_URL": s3.url, "INFINITETALK_API_S3_INPUTS": "1"}
        api = spawn_server(tiny_models, tmp_path / "api", {**env, "INFINITETALK_API_WORKER": "0"})
        gpu = spawn_server(tiny_models, tmp_path / "gpu", env)
        try:
            wavespeed = pytest.importorskip("wavespeed")   # its upload helper: a presigned PUT into the bucket
            image = wavespeed.Client(api_key="loopback-needs-none", base_url=api.url).upload(str(png))
            assert image.startswith(api.url + "/infinitetalk/v1/uploads/")
            body = {"image": image, "left_audio": _wav_uri(0.6, 180.0), "right_audio": _wav_uri(0.4, 290.0), "seed": 11}
            code, reply = api.call("POST", "/infinitetalk/v1/image-to-video-multi", body)
            assert code == 200, reply
            job = reply["data"]["id"]
            deadline = time.time() + 600
            while (data := api.call("GET", f"/infinitetalk/v1/predictions/{job}/result")[1]["data"])["status"] \
                    not in ("completed", "failed"):
                assert time.time() < deadline and gpu.process.poll() is None, gpu.log.read_text()[-3000:]
                time.sleep(0.5)
            assert data["status"] == "completed", data
            [url] = data["outputs"]
            assert url.startswith(f"{s3.url}/{BUCKET}/") and "X-Amz-Signature=" in url
            with urllib.request.urlopen(url, timeout=60) as r:
                video = r.read()
            assert video[4:8] == b"ftyp"
            staged = sorted(p.relative_to(gpu.base / "input").parts[-2] for p in
                            (gpu.base / "input" / "infinitetalk_api" / job / "staged").rglob("*") if p.is_file())
            assert staged == ["image", "left_audio", "right_audio"]     # the worker ran from the bucket's copies
            assert not (api.base / "output" / "infinitetalk_api").exists()   # and the API server rendered nothing
            listed = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1", aws_access_key_id="testing",
                                  aws_secret_access_key="testing").list_objects_v2(Bucket=BUCKET)
            keys = sorted(o["Key"] for o in listed.get("Contents", []))
            assert [k for k in keys if not k.startswith("uploads/")] == [k for k in keys if k.startswith(f"{job}/")]
            assert len([k for k in keys if k.startswith(f"{job}/")]) == 1   # the video; the staged inputs are gone
        finally:
            stop_server(api)
            stop_server(gpu)
    finally:
        s3.stop()
