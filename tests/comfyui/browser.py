"""A headless Chromium driven over the DevTools protocol (aiohttp websocket), for loading graphs in the real frontend.

Test-only: needs a `chromium` (or `CHROMIUM` = path) binary; everything stays on 127.0.0.1 and the browser
gets a fresh profile with networking features off. `Browser.open(url)` yields a `Page` that evaluates
JavaScript, collects console errors and uncaught exceptions, and takes PNG screenshots.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from comfy_server import stop_process

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


def chromium_binary() -> str | None:
    """The Chromium to drive: $CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One tab: `evaluate` runs an expression (promises awaited) and returns its JSON value."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self._ids = ws, itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.console: list[dict] = []  # {"level", "text", "url"} of console errors/warnings + exceptions
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                p = data["params"]
                if p["type"] in ("error", "warning", "assert"):
                    frame = (p.get("stackTrace") or {}).get("callFrames") or [{}]
                    text = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
                    self.console.append({"level": p["type"], "text": text, "url": frame[0].get("url", "")})
            elif data.get("method") == "Runtime.exceptionThrown":
                d = data["params"]["exceptionDetails"]
                text = (d.get("exception") or {}).get("description") or d.get("text", "")
                self.console.append({"level": "exception", "text": text, "url": d.get("url", "")})
            elif data.get("method") == "Log.entryAdded":
                e = data["params"]["entry"]
                if e["level"] == "error":
                    self.console.append({"level": "log", "text": e.get("text", ""), "url": e.get("url", "")})

    async def send(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        msg_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str, timeout: float = 60.0):
        result = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                      "returnByValue": True}, timeout)
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise RuntimeError((d.get("exception") or {}).get("description") or d.get("text"))
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0, every: float = 0.25):
        """Poll until `expression` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            await asyncio.sleep(every)

    async def screenshot(self, path: Path, clip: dict | None = None) -> None:
        """PNG of the page, or of `clip` ({x, y, width, height, scale} in CSS pixels)."""
        data = await self.send("Page.captureScreenshot", {"format": "png", **({"clip": clip} if clip else {})})
        Path(path).write_bytes(base64.b64decode(data["data"]))


class Browser:
    """`async with Browser() as b: page = await b.open(url)`; the browser process is stopped by its own PID."""

    def __init__(self, width: int = 1600, height: int = 1000):
        self.size = (width, height)
        self.process: subprocess.Popen | None = None

    async def __aenter__(self) -> "Browser":
        self.profile = Path(tempfile.mkdtemp(prefix="infinitetalk-chromium-"))
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError("no chromium binary")
        args = [binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={self.size[0]},{self.size[1]}",
                "about:blank"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                await self.__aexit__()
                raise RuntimeError("chromium did not open its DevTools port")
            await asyncio.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        return self

    async def open(self, url: str) -> Page:
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as r:
            targets = [t for t in await r.json() if t["type"] == "page"]
        ws = await self.session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        for domain in ("Runtime", "Page", "Log"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride", {"width": self.size[0], "height": self.size[1],
                                                               "deviceScaleFactor": 1, "mobile": False})
        await page.send("Page.navigate", {"url": url})
        return page

    async def __aexit__(self, *exc) -> None:
        if getattr(self, "session", None) is not None:
            await self.session.close()
        if self.process is not None:
            stop_process(self.process, timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)
