"""Helpers for the job-API tests: small media files, a fake engine, a loopback file server."""
from __future__ import annotations

import math
import struct
import wave
import zlib
from pathlib import Path

from infinitetalk.service.jobs import EngineState


def write_wav(path: Path, seconds: float, rate: int = 16000, freq: float = 220.0) -> Path:
    n = int(seconds * rate)
    frames = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate))) for i in range(n))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
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


def write_png(path: Path, width: int = 64, height: int = 48) -> Path:
    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in (x * 4 % 256, y * 5 % 256, 128))
                    for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


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

    def cancel(self, prompt_id: str) -> bool:
        if self.states.get(prompt_id) and self.states[prompt_id].status == "queued":
            del self.states[prompt_id]
            return True
        return False

    def finish(self, prompt_id: str, filename: str = "out.mp4") -> None:
        self.states[prompt_id] = EngineState("completed", [{"filename": filename, "subfolder": "infinitetalk_api", "type": "output"}],
                                             inference_ms=1234)
