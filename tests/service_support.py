"""Helpers for the job-API tests: generated media (incl. over-limit ones), a fake engine, an in-process
API on 127.0.0.1, a peak-memory probe."""
from __future__ import annotations

import asyncio
import math
import struct
import wave
import zlib
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from infinitetalk.service.inputs import InputSettings
from infinitetalk.service.jobs import EngineState, JobService
import weakref

from infinitetalk.service.routes import JobApi
from infinitetalk.service.store import JobStore
from infinitetalk.service.worker import Worker

TEMPLATE = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "image"}},
    "2": {"class_type": "InfiniteTalkLoadTwoAudios", "inputs": {"left_audio": "a.wav", "right_audio": "b.wav"}},
    "3": {"class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "alpha"}, "_meta": {"title": "mask_image"}},
    "4": {"class_type": "InfiniteTalkMultiSampler", "inputs": {
        "prompt": "", "order": "left_right", "resolution": "480p", "seed": 0,
        "preset": "fast", "steps": 6, "text_guidance": 1.0, "audio_guidance": 2.0,
        "image": ["1", 0], "left_audio": ["2", 0], "right_audio": ["2", 1], "mask": ["3", 0]}},
    "5": {"class_type": "InfiniteTalkVideoCombine", "inputs": {"filename_prefix": "x", "video": ["4", 0]}},
}
KEY = "secret-key-123"


def write_wav(path: Path, seconds: float, rate: int = 16000, freq: float = 220.0, channels: int = 1) -> Path:
    n = int(seconds * rate)
    frames = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate))) * channels
                      for i in range(n))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return path


def write_long_wav(path: Path, seconds: float, rate: int = 8000) -> Path:
    """A quiet tone of `seconds` (written in blocks; used for the 10-minute limit)."""
    block = b"".join(struct.pack("<h", int(300 * math.sin(2 * math.pi * 200 * i / rate))) for i in range(rate))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        for _ in range(int(seconds)):
            w.writeframes(block)
    return path


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png(width: int, height: int, color_type: int, idat: bytes) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def write_png(path: Path, width: int = 64, height: int = 48) -> Path:
    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in (x * 4 % 256, y * 5 % 256, 128))
                    for y in range(height))
    path.write_bytes(_png(width, height, 2, zlib.compress(rows)))
    return path


def write_flat_png(path: Path, width: int, height: int, rgba: tuple[int, int, int, int]) -> Path:
    """One-colour RGBA PNG (masks: all black, all white, fully transparent)."""
    rows = (b"\x00" + bytes(rgba) * width) * height
    path.write_bytes(_png(width, height, 6, zlib.compress(rows)))
    return path


def png_bomb(width: int, height: int) -> bytes:
    """A valid black RGB PNG of width×height pixels whose file is tiny: a decompression bomb.

    Built from one fully-flushed deflate block of zero rows repeated (identical after a full flush), so a
    16000×16000 picture (768 MB decoded) takes well under a second and ~1 MB to make.
    """
    row = b"\x00" * (1 + 3 * width)
    rows_per_block = 16
    assert height % rows_per_block == 0
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(row * rows_per_block) + co.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)  # an empty last block
    total = len(row) * height
    adler = ((total % 65521) << 16) | 1  # Adler-32 of all-zero data: a stays 1, b = n mod 65521
    idat = b"\x78\xda" + block * (height // rows_per_block) + final + struct.pack(">I", adler)
    return _png(width, height, 2, idat)


def encoded_audio(rate: int, seconds: float, channels: int = 1, codec: str = "flac", fmt: str = "flac") -> bytes:
    """Silence encoded with PyAV (e.g. a 384 kHz FLAC, which is a few kB)."""
    import io

    import av
    import numpy as np

    layouts = {1: "mono", 2: "stereo", 8: "7.1"}
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layouts[channels]
        frame = av.AudioFrame.from_ndarray(np.zeros((1, int(rate * seconds) * channels), np.int16), format="s16",
                                           layout=layouts[channels])
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buf.getvalue()


class PeakMemory:
    """Peak resident memory of process `pid` (default: this one) above its level at entry, sampled
    every few ms from a thread while the block runs."""

    def __init__(self, pid: int | None = None):
        import psutil

        self.process = psutil.Process(pid)
        self.peak_extra = 0

    def __enter__(self) -> "PeakMemory":
        import threading

        self.base = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_extra = max(self.peak_extra, self.process.memory_info().rss - self.base)
            self._stop.wait(0.003)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_extra = max(self.peak_extra, self.process.memory_info().rss - self.base)


class FakeEngine:
    """Stands in for ComfyUI's queue: jobs stay queued until the test moves them on."""

    def __init__(self):
        self.graphs: dict[str, dict] = {}
        self.states: dict[str, EngineState] = {}
        self.counter = 0

    async def queue(self, graph: dict, job_id: str) -> str:
        self.counter += 1
        pid = f"prompt-{self.counter}"
        self.graphs[pid] = graph
        self.states[pid] = EngineState("queued", [])
        return pid

    def state(self, prompt_id: str) -> EngineState:
        return self.states.get(prompt_id, EngineState("unknown", []))

    def busy(self) -> bool:
        return any(st.status in ("queued", "running") for st in self.states.values())

    def cancel(self, prompt_id: str) -> bool:
        if self.states.get(prompt_id) and self.states[prompt_id].status == "queued":
            del self.states[prompt_id]
            return True
        return False

    def finish(self, prompt_id: str, filename: str = "out.mp4") -> None:
        self.states[prompt_id] = EngineState("completed", [{"filename": filename, "subfolder": "infinitetalk_api", "type": "output"}],
                                             inference_ms=1234)



WORKERS: "weakref.WeakKeyDictionary[JobService, Worker]" = weakref.WeakKeyDictionary()


def with_worker(store, engine, settings: InputSettings, workflows: dict, worker_kw: dict,
                **service_kw) -> tuple[JobService, Worker]:
    """A JobService and its local Worker, wired as app.build wires them (a cancel reaches the worker at once);
    `call` steps the worker of a service made here."""
    worker = None
    service = JobService(store, engine, settings, workflows, local_cancel=lambda job_id: worker.cancel_if_mine(job_id),
                         **service_kw)
    worker = Worker(service, **worker_kw)
    WORKERS[service] = worker
    return service, worker


def make_env(tmp_path: Path, **settings) -> dict:
    """An input folder with two.png / left.wav / right.wav / broken.wav and a JobService on a FakeEngine."""
    inputs = tmp_path / "input"
    inputs.mkdir()
    write_wav(inputs / "left.wav", 1.0)
    write_wav(inputs / "right.wav", 0.6, freq=330)
    write_png(inputs / "two.png")
    (inputs / "broken.wav").write_bytes(b"RIFF....not really audio")
    engine = FakeEngine()
    store_path = tmp_path / "user" / "jobs.sqlite3"
    service, worker = with_worker(JobStore(store_path), engine, InputSettings(input_dir=inputs, **settings), {
        "image-to-video-multi": TEMPLATE, "video-to-video-multi": TEMPLATE}, {"lease_s": 30.0, "worker_id": "worker-test"},
        cancel_wait_s=0.0)
    return {"inputs": inputs, "engine": engine, "service": service, "store_path": store_path, "tmp": tmp_path,
            "worker": worker}


async def dispatch(env: dict, job_id: str, ticks: int = 50) -> str:
    """Step the env's worker until it has queued `job_id` on the fake engine (ending whatever job it ran
    before that the test has finished); returns the job's prompt id."""
    worker = env["worker"]
    for _ in range(ticks):
        if worker.job is not None and worker.job.id == job_id and worker.prompt_id:
            return worker.prompt_id
        await worker.tick()
    raise AssertionError(f"the worker never queued job {job_id}")


async def settle(env: dict, ticks: int = 5) -> None:
    """Let the env's worker observe the engine (a few steps), e.g. after the test moved a job on."""
    for _ in range(ticks):
        await env["worker"].tick()


def call(service, requests, keys=(), is_open: bool = False, local_worker: bool = True):
    """Run `requests(client)` against a loopback server hosting the API; returns its result. Then the
    service's worker (if any; `local_worker=False`: an API-only server) takes a few steps, so the first queued
    job is on the fake engine."""
    worker = WORKERS.get(service) if local_worker else None

    async def main():
        app = web.Application(client_max_size=200 * 2**20)  # ComfyUI allows large bodies too
        app.add_routes(JobApi(service, keys=lambda: tuple(keys), is_open=lambda: is_open, worker=worker).routes())
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            result = await requests(client)
        for _ in range(3 if worker is not None else 0):
            await worker.tick()
        return result
    return asyncio.run(main())


def body(**over):
    b = {"image": "two.png", "left_audio": "left.wav", "right_audio": "right.wav", "prompt": "two friends chat"}
    b.update(over)
    return {k: v for k, v in b.items() if v is not None}


async def post(client, path, payload, headers=None):
    resp = await client.post(path, json=payload, headers=headers or {})
    return resp.status, await resp.json()
