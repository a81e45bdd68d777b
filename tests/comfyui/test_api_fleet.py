"""Real-ComfyUI tier: a fleet of two ComfyUI servers on one throwaway PostgreSQL (skipped unless
COMFYUI_DIR is set; PostgreSQL as in the CI tier).

Both servers share the input folder, the output folder and the job folders (`INFINITETALK_JOBS_DIR`) and
use a short lease. A job long enough for 3 windows is submitted; once its first window is committed in the
job folder, the server running it is killed (SIGKILL). The other server takes the job over when the lease
runs out, resumes it from the committed window and finishes it; the video is byte-identical to an
uninterrupted run with the same seed. Status and result answer on both servers, incl. the one that did
not take the job. The job's webhook (a loopback receiver here, answering 500 once, then 200) is delivered
once, signed, by the server that finished it, after one retry.
"""
from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import signal
import threading
import time
import urllib.request
import wave
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from comfy_server import COMFYUI_DIR, make_base, spawn_server, stop_server, tiny_api_workflows

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no ComfyUI source tree)")]

RATE = 16000
LEFT_S, RIGHT_S = 3.5, 3.0   # 6.5 s in a row = 162 frames: windows of 81, then +72, +72 → 3 windows
LEASE_S = "4"
FINAL = ("completed", "failed")
SECRET = "whsec_fleet-test-secret-0123456789"


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1 answering `statuses` in turn (the last repeating); keeps what it got."""

    def __init__(self, statuses: list[int]):
        self.statuses, self.received = statuses, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.received.append((dict(self.headers), raw))
                self.send_response(outer.statuses[min(len(outer.received), len(outer.statuses)) - 1])
                self.end_headers()

            def log_message(self, *args):
                pass
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _signed(headers: dict, raw: bytes) -> bool:
    key = SECRET.removeprefix("whsec_").encode()
    given = headers["webhook-signature"].partition(",")[2]
    mac = hmac.new(key, f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + raw, hashlib.sha256)
    return hmac.compare_digest(mac.hexdigest(), given)


def _wav(path: Path, seconds: float, freq: float) -> None:
    t = np.arange(int(seconds * RATE)) / RATE
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((8000 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes())


def _status(server, job_id: str, route: str = "status") -> dict:
    code, reply = server.call("GET", f"/infinitetalk/v1/predictions/{job_id}/{route}")
    assert code == 200, reply
    return reply["data"]


def _wait(server, job_id: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        data = _status(server, job_id)
        if data["status"] in FINAL:
            return data
        assert server.process.poll() is None, "the server died:\n" + server.log.read_text()[-4000:]
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not end in {timeout} s")


def _committed_windows(jobs_dir: Path) -> int:
    best = 0
    for state in jobs_dir.glob("*/state.json"):
        try:
            best = max(best, int(json.loads(state.read_text()).get("windows_done", 0)))
        except (ValueError, OSError):   # being replaced right now
            pass
    return best


def _video_bytes(server, data: dict, output: Path) -> bytes:
    assert data["status"] == "completed" and data["error"] == "" and len(data["outputs"]) == 1, data
    query = parse_qs(urlsplit(data["outputs"][0]).query)
    with urllib.request.urlopen(data["outputs"][0], timeout=60) as r:
        served = r.read()
    assert served == (output / query["subfolder"][0] / query["filename"][0]).read_bytes()
    return served


@pytest.fixture()
def fleet(tiny_models, tmp_path, postgres_url, custom_node_package):
    shared = tmp_path / "shared"
    for d in ("input", "output", "jobs"):
        (shared / d).mkdir(parents=True)
    picture = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    custom_node_package.nodes.media.write_png(picture, shared / "input" / "two.png")
    _wav(shared / "input" / "left.wav", LEFT_S, 180.0)
    _wav(shared / "input" / "right.wav", RIGHT_S, 290.0)
    env = {"INFINITETALK_API_WORKFLOWS": str(tiny_api_workflows(tmp_path / "workflows")),
           "INFINITETALK_API_DATABASE_URL": postgres_url, "INFINITETALK_JOBS_DIR": str(shared / "jobs"),
           "INFINITETALK_API_LEASE_SECONDS": LEASE_S, "INFINITETALK_API_WEBHOOK_SECRET": SECRET,
           "INFINITETALK_API_ALLOW_HOSTS": "127.0.0.1"}   # the webhook receiver is on loopback (tests only)
    servers = []
    try:
        for name in ("a", "b"):
            base = make_base(tmp_path / name)
            for d in ("input", "output"):      # the shared folders, as NFS would provide them
                (base / d).rmdir()
                (base / d).symlink_to(shared / d, target_is_directory=True)
            servers.append(spawn_server(tiny_models, base, env, fresh=False))
        yield servers, shared
    finally:
        for server in servers:
            if server.process.poll() is None:
                stop_server(server)


def test_a_killed_servers_job_is_finished_by_the_other_byte_identical(fleet):
    (a, b), shared = fleet
    body = {"image": "two.png", "left_audio": "left.wav", "right_audio": "right.wav", "order": "left_right",
            "seed": 4242}
    for server in (a, b):                            # both ready, each with its own worker
        assert server.call("GET", "/infinitetalk/v1/health") == \
            (200, {"code": 200, "message": "success", "data": {"status": "ok", "database": "ok", "worker": "idle"}})
    hook = Receiver([500, 200])
    code, reply = a.call("POST", f"/infinitetalk/v1/image-to-video-multi?webhook={hook.url}", body)
    assert code == 200, reply
    job_id = reply["data"]["id"]
    deadline = time.time() + 600
    while _committed_windows(shared / "jobs") < 1:   # the first window is on shared storage
        assert time.time() < deadline, "no window was committed"
        assert _status(b, job_id)["status"] != "failed", _status(b, job_id)
        time.sleep(0.2)
    logs = {a: a.log.read_text(), b: b.log.read_text()}
    # the server that runs it is the one whose ComfyUI queue holds it
    owner = next(s for s in (a, b) if s.call("GET", "/queue")[1].get("queue_running"))
    other = b if owner is a else a
    for route in ("status", "result"):               # the other server answers for a job it does not hold
        running = _status(other, job_id, route)
        assert running["id"] == job_id and running["status"] == "processing" and running["seed"] == 4242, running
    os.kill(owner.process.pid, signal.SIGKILL)
    owner.process.wait(30)
    done = _wait(other, job_id)
    mp4 = _video_bytes(other, done, shared / "output")
    since = other.log.read_text()[len(logs[other]):]
    assert f"took over job {job_id}" in since
    resumed = [line for line in since.splitlines() if "resuming job" in line]
    assert resumed and " 0 of " not in resumed[0], since[-3000:]   # resumed, not started over
    assert _status(other, job_id, "result") == done
    deadline = time.time() + 60
    while len(hook.received) < 2 and time.time() < deadline:   # the 500, then the retry (2 s later)
        time.sleep(0.2)
    time.sleep(1.0)
    hook.shutdown()
    assert len(hook.received) == 2, hook.received
    assert all(h["webhook-id"] == job_id and _signed(h, raw) for h, raw in hook.received)
    sent = json.loads(hook.received[1][1])   # WaveSpeed's flat prediction object: the result data, its links on
    assert sent["outputs"][0].startswith(a.url + "/") and sent["urls"]["get"].startswith(a.url + "/")  # submit origin
    assert sent["has_nsfw_contents"] == [False] and sent["input"]["seed"] == done["seed"]
    shared_fields = {k: v for k, v in sent.items() if k != "input"}
    assert json.dumps(shared_fields).replace(a.url, "") == json.dumps(done).replace(other.url, "")

    # The same request, same seed, uninterrupted (the job folder was removed when the first one finished).
    assert _committed_windows(shared / "jobs") == 0
    code, reply = other.call("POST", "/infinitetalk/v1/image-to-video-multi", body)
    assert code == 200, reply
    again = _wait(other, reply["data"]["id"])
    assert again["seed"] == done["seed"] == 4242
    assert _video_bytes(other, again, shared / "output") == mp4
