"""Helpers for the real-ComfyUI tier: a server with this package installed, on 127.0.0.1 (needs COMFYUI_DIR; skipped otherwise).

COMFYUI_DIR: a ComfyUI source tree (>= 0.10); COMFYUI_PYTHON: a Python that runs it (default: this one).
The server gets a temp --base-directory (custom_nodes/ with a symlink to this repository, input/ with
tiny media), --extra-model-paths-config pointing at the tiny models, --cpu --cache-none.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
MODEL_FOLDERS = ("diffusion_models", "model_patches", "loras", "audio_encoders", "wav2vec2", "text_encoders",
                 "clip_vision", "vae")
# loader widget values selecting the tiny models tree (what the workflows' loader node gets in tests)
TINY_LOADER = {
    "diffusion_model": "tiny_wan2.1_i2v_480p_bf16.safetensors",
    "infinitetalk_patch": "tiny_wan2.1_infiniteTalk_multi_fp16.safetensors",
    "lora": "none", "audio_encoder": "wav2vec2-chinese-base_fp16.safetensors",
    "text_encoder": "umt5_xxl_fp16.safetensors", "clip_vision": "clip_vision_h.safetensors",
    "vae": "wan_2.1_vae.safetensors", "precision": "fp32", "offload": "off",
}


API_WORKFLOW_FILES = ("infinitetalk_multi_image_api.json", "infinitetalk_multi_video_api.json")
TINY_SAMPLER = {"preset": "quality", "steps": 1, "size_scale": 0.05}


def tiny_api_workflows(folder: Path) -> Path:
    """Copies of the shipped API workflows in `folder` set to the tiny models and one tiny step
    (for `INFINITETALK_API_WORKFLOWS`)."""
    folder.mkdir()
    for name in API_WORKFLOW_FILES:
        graph = json.loads((ROOT / "workflows" / "api" / name).read_text())
        kinds = {node["class_type"] for node in graph.values()}
        assert {"InfiniteTalkModelLoader", "InfiniteTalkMultiSampler"} <= kinds, name
        for node in graph.values():
            if node["class_type"] == "InfiniteTalkModelLoader":
                node["inputs"].update(TINY_LOADER)
            if node["class_type"] == "InfiniteTalkMultiSampler":
                node["inputs"].update(TINY_SAMPLER)
        (folder / name).write_text(json.dumps(graph))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(base: Path, models: Path) -> list[str]:
    config = base / "extra_model_paths.yaml"
    lines = ["infinitetalk_tiny:", f"    base_path: {models}"] + [f"    {f}: {f}" for f in MODEL_FOLDERS]
    config.write_text("\n".join(lines) + "\n")
    return ["main.py", "--cpu", "--disable-auto-launch", "--cache-none", "--base-directory", str(base),
            "--extra-model-paths-config", str(config)]


def make_base(base: Path) -> Path:
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "infinitetalk_multi").symlink_to(ROOT, target_is_directory=True)
    for d in ("input", "output", "temp", "user", "models"):
        (base / d).mkdir()
    return base


class Server:
    def __init__(self, url: str, process: subprocess.Popen, base: Path, log: Path):
        self.url, self.process, self.base, self.log = url, process, base, log

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        return self.call("POST", path, body)

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
        """(HTTP status, JSON reply) of one request; an error status is returned, not raised."""
        req = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw.strip() else {}
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def run(self, graph: dict, timeout: float = 900.0) -> dict:
        """Queue an API graph and wait for its history entry (completed or error)."""
        status, body = self.post("/prompt", {"prompt": graph, "client_id": "infinitetalk-tests"})
        assert status == 200, body
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and (entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                return entry
            assert self.process.poll() is None, "the server died:\n" + self.log.read_text()[-4000:]
            time.sleep(1.0)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


def start_server(tiny_models: Path, base: Path):
    """Generator: yields a running Server, stops it (by its own PID) afterwards."""
    make_base(base)
    port = _free_port()
    log = base / "server.log"
    args = [COMFYUI_PYTHON, *server_args(base, tiny_models), "--listen", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(args, cwd=COMFYUI_DIR, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, base, log)
    try:
        deadline = time.time() + 120
        while True:
            try:
                server.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ComfyUI did not start:\n" + log.read_text()[-4000:])
                time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def spawn_server(tiny_models: Path, base: Path, env: dict[str, str] | None = None, fresh: bool = True) -> Server:
    """Start a server (extra environment `env`) and wait until it answers; `fresh=False` reuses `base`.

    The caller stops it with `stop_server` (by its own PID).
    """
    if fresh:
        make_base(base)
    port = _free_port()
    log = base / f"server-{port}.log"
    args = [COMFYUI_PYTHON, *server_args(base, tiny_models), "--listen", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(args, cwd=COMFYUI_DIR, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", process, base, log)
    deadline = time.time() + 120
    while True:
        try:
            server.get("/system_stats")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            if process.poll() is not None or time.time() > deadline:
                stop_server(server)
                raise RuntimeError("ComfyUI did not start:\n" + log.read_text()[-4000:])
            time.sleep(0.5)


def stop_process(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Terminate a process this test started (its own PID only), killing it if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


def stop_server(server: Server) -> None:
    stop_process(server.process)
