"""Helpers for the S3 / webhook / drop-in route tests: a JobService + Worker env, a recording webhook
receiver and a moto S3 server, all on 127.0.0.1 and each stopped by the test that started it."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from infinitetalk.service.inputs import InputSettings
from infinitetalk.service.store import JobStore
from service_support import TEMPLATE, FakeEngine, dispatch, settle, with_worker, write_png, write_wav

SECRET = "whsec_test-secret-0123456789abcdef"


def make_edge_env(tmp_path: Path, store_path: Path | None = None, inputs: Path | None = None,
                  engine: FakeEngine | None = None, **service_kw) -> dict:
    """Like service_support.make_env, with `service_kw` for JobService (outputs / on_final / webhook_check)."""
    if inputs is None:
        inputs = tmp_path / "input"
        inputs.mkdir()
        write_wav(inputs / "left.wav", 1.0)
        write_wav(inputs / "right.wav", 0.6, freq=330)
        write_png(inputs / "two.png")
    engine = engine or FakeEngine()
    store_path = store_path or tmp_path / "user" / "jobs.sqlite3"
    settings = InputSettings(input_dir=inputs, allow_hosts=("127.0.0.1",))
    service, worker = with_worker(JobStore(store_path), engine, settings,
                                  {"image-to-video-multi": TEMPLATE, "video-to-video-multi": TEMPLATE},
                                  {"lease_s": 30.0, "poll_s": 0.02, "worker_id": f"worker-{store_path.parent.name}"},
                                  cancel_wait_s=0.0, **service_kw)
    return {"inputs": inputs, "engine": engine, "service": service, "store_path": store_path, "settings": settings,
            "worker": worker}


async def finish_job(env: dict, job_id: str, filename: str = "out.mp4") -> None:
    """The env's worker queues `job_id` on the fake engine, the engine finishes it, the worker records the end."""
    prompt_id = await dispatch(env, job_id)
    env["engine"].finish(prompt_id, filename)
    await settle(env)


class Receiver:
    """A webhook receiver on 127.0.0.1 answering `statuses` in turn (the last one repeating); with `answer_bytes`,
    each answer streams a body that long (announced in Content-Length) and `sent` counts what got out."""

    def __init__(self, statuses: list[int], answer_bytes: int = 0):
        self.statuses = list(statuses)
        self.answer_bytes = answer_bytes
        self.sent = 0
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        status = self.statuses[min(len(self.received), len(self.statuses)) - 1]
        if status in (301, 302, 307):
            return web.Response(status=status, headers={"Location": "http://127.0.0.1:9/elsewhere"})
        if self.answer_bytes:
            return await self._huge(request, status)
        return web.Response(status=status, text="ok")

    async def _huge(self, request: web.Request, status: int) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={"Content-Length": str(self.answer_bytes)})
        await resp.prepare(request)
        chunk = b"x" * (1 << 20)
        try:
            for start in range(0, self.answer_bytes, len(chunk)):
                await resp.write(chunk[: self.answer_bytes - start])
                self.sent += min(len(chunk), self.answer_bytes - start)
        except (ConnectionError, RuntimeError):   # the sender hung up: what it wanted was read
            pass
        return resp

    async def __aenter__(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """`python -m moto.server -H 127.0.0.1 -p PORT` as a subprocess; `stop()` ends it by its own PID."""

    def __init__(self, log: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=2).read()
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("moto server did not start:\n" + log.read_text()[-2000:])
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


def run(coro):
    return asyncio.run(coro)


CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 for the module (import the fixture into a test module to use it)."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture()
def aws_env(monkeypatch):
    """boto3's credentials for moto, and no profile or session token of the machine's."""
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
