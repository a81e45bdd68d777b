"""Real-ComfyUI tier of the job API's bad-input suite (skipped unless COMFYUI_DIR is set).

One ComfyUI server (tiny models) with NO key configured at start: the API must answer loopback clients only
when no proxy header is present. A key is then written into `INFINITETALK_API_KEYS_FILE` (read per
request) for the key tests. Every hostile input class is sent as a `data:` URI; after each, the server must
still answer, its memory must not have grown by 1 GB, nothing may be queued and no file may stay under
`<input>/infinitetalk_api/`. Finally one job whose audio is 8-channel and 192 kHz (inside the limits) must
complete and be billed. Everything talks to 127.0.0.1 only.
"""
from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import service_support as support  # tests/ (on sys.path through tests/conftest.py)
from comfy_server import COMFYUI_DIR, spawn_server, stop_server, tiny_api_workflows

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no ComfyUI source tree)")]

KEY = "bad-inputs-key-51d2"
IMG = "image-to-video-multi"
VID = "video-to-video-multi"


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory, custom_node_package):
    root = tmp_path_factory.mktemp("api_bad")
    keys_file = root / "keys.txt"
    keys_file.write_text("# no key yet: the API fails closed to loopback clients without proxy headers\n")
    env = {"INFINITETALK_API_WORKFLOWS": str(tiny_api_workflows(root / "workflows")),
           "INFINITETALK_API_KEYS_FILE": str(keys_file)}
    srv = spawn_server(tiny_models, root / "base", env)
    inputs = srv.base / "input"
    support.write_png(inputs / "two.png", 96, 64)
    support.write_wav(inputs / "left.wav", 0.5, freq=180)
    support.write_wav(inputs / "right.wav", 0.3, freq=290)
    srv.keys_file = keys_file
    yield srv
    stop_server(srv)


def _call(server, method: str, path: str, body: dict | None = None, headers: dict | None = None,
          raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _body(**over) -> dict:
    b = {"image": "two.png", "left_audio": "left.wav", "right_audio": "right.wav", "seed": 5}
    b.update(over)
    return b


def _orphans(server) -> list[str]:
    root = server.base / "input" / "infinitetalk_api"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.is_dir() else []


def _alive(server) -> None:
    assert server.process.poll() is None, "the server died:\n" + server.log.read_text()[-4000:]
    assert server.get("/system_stats")["system"]["comfyui_version"]


def test_no_key_fails_closed_behind_a_proxy(server):
    for header in ({"X-Forwarded-For": "203.0.113.7"}, {"Forwarded": "for=203.0.113.7"}, {"X-Real-IP": "203.0.113.7"}):
        code, reply = _call(server, "POST", f"/infinitetalk/v1/{IMG}", _body(), header)
        assert code == 401 and reply["code"] == 401 and "proxy" in reply["message"], reply
    code, reply = _call(server, "GET", "/infinitetalk/v1/predictions/abc/status", headers={"X-Real-IP": "1.2.3.4"})
    assert code == 401, reply
    log = server.log.read_text()
    assert "no API key configured" in log and "X-Forwarded-For" in log, log[-3000:]  # the start-up warning


def test_routes_answer_in_the_envelope_for_wrong_methods_and_bad_bodies(server):
    for method, path, status in (("GET", f"/infinitetalk/v1/{IMG}", 405), ("GET", "/api/infinitetalk/v1/" + VID, 405),
                                 ("POST", "/infinitetalk/v1/predictions/abc/result", 405),
                                 ("GET", "/infinitetalk/v1/no/such/route", 404)):
        code, reply = _call(server, method, path)
        assert code == status and reply["code"] == status and reply["data"] is None, (method, path, reply)
    code, reply = _call(server, "POST", f"/infinitetalk/v1/{IMG}", raw=b"[" * 100_000 + b"]" * 100_000)
    assert code == 400 and "nested" in reply["message"], reply
    code, reply = _call(server, "POST", f"/infinitetalk/v1/{IMG}", _body(order=0))
    assert code == 400 and "field 'order'" in reply["message"], reply
    _alive(server)


def _bad_media(tmp: Path) -> dict[str, tuple[str, str, str, list[str]]]:
    """case -> (route, field, data: URI, words of the refusal)."""

    def wav(name, seconds, **kw):
        return _uri("audio/wav", support.write_wav(tmp / name, seconds, **kw).read_bytes())

    bomb = _uri("image/png", support.png_bomb(16000, 16000))
    return {
        "image_bomb": (IMG, "image", bomb, ["16000×16000", "megapixels"]),
        "mask_bomb": (IMG, "mask_image", bomb, ["16000×16000", "megapixels"]),
        "video_is_a_bomb": (VID, "video", bomb, []),
        "flac_384k": (IMG, "left_audio", _uri("audio/flac", support.encoded_audio(384_000, 0.5)), ["384000 Hz"]),
        "audio_30ms": (IMG, "right_audio", wav("short.wav", 0.03), ["30 ms"]),
        "audio_33_channels": (IMG, "left_audio", wav("many.wav", 0.2, channels=33), ["33 channels"]),
        "black_mask": (IMG, "mask_image", _uri("image/png", support.write_flat_png(tmp / "b.png", 96, 64, (0, 0, 0, 255))
                                                .read_bytes()), ["empty"]),
        "noise_video": (VID, "video", _uri("video/mp4", bytes(range(256)) * 64), []),
    }


def test_every_bad_input_is_refused_and_the_server_stays_healthy(server, tmp_path):
    for case, (route, field, value, words) in _bad_media(tmp_path).items():
        body = _body(**{field: value})
        if route == VID:
            body.pop("image")
        with support.PeakMemory(server.process.pid) as memory:
            started = time.perf_counter()
            code, reply = _call(server, "POST", f"/infinitetalk/v1/{route}", body)
            elapsed = time.perf_counter() - started
        assert code == 400 and reply["code"] == 400 and reply["data"] is None, (case, str(reply)[:300])
        assert reply["message"].startswith(f"field '{field}': ") and all(w in reply["message"] for w in words), \
            (case, reply["message"])
        assert str(server.base) not in reply["message"], reply["message"]
        assert elapsed < 10, f"{case}: {elapsed:.1f} s"
        assert memory.peak_extra < 1 << 30, f"{case}: server grew by {memory.peak_extra / 2**20:.0f} MB"
        _alive(server)
        assert _orphans(server) == [], (case, _orphans(server))
    queue = server.get("/queue")
    assert not queue["queue_running"] and not queue["queue_pending"], queue


def test_undecodable_authorization_bytes_are_401_once_a_key_is_set(server):
    server.keys_file.write_text(KEY + "\n")
    try:
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as s:
            payload = json.dumps(_body()).encode()
            s.sendall(f"POST /infinitetalk/v1/{IMG} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(payload)}\r\nConnection: close\r\n".encode()
                      + b"Authorization: Bearer \xff\xfe\r\n\r\n" + payload)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
        code, reply = _call(server, "POST", f"/infinitetalk/v1/{IMG}", _body(), {"Authorization": "Bearer nope"})
        assert code == 401 and "invalid API key" in reply["message"]
    finally:
        server.keys_file.write_text("# no key\n")
    _alive(server)


def test_eight_channel_and_192_khz_audio_completes_and_is_billed(server):
    inputs = server.base / "input"
    support.write_wav(inputs / "eight.wav", 0.4, channels=8)
    support.write_wav(inputs / "hi.wav", 0.3, rate=192_000)
    code, reply = _call(server, "POST", f"/infinitetalk/v1/{IMG}",
                        _body(left_audio="eight.wav", right_audio="hi.wav", order="meanwhile"))
    assert code == 200, reply
    job_id = reply["data"]["id"]
    deadline = time.time() + 600
    while True:
        code, reply = _call(server, "GET", f"/infinitetalk/v1/predictions/{job_id}/status")
        assert code == 200, reply
        if reply["data"]["status"] in ("completed", "failed"):
            break
        assert time.time() < deadline, "the job did not end"
        _alive(server)
        time.sleep(1)
    data = reply["data"]
    assert data["status"] == "completed" and data["error"] == "" and len(data["outputs"]) == 1, data
    assert data["billed_seconds"] == 5
