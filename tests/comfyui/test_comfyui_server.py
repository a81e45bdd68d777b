"""Real-ComfyUI tier: the package inside a running ComfyUI (skipped unless COMFYUI_DIR is set).

Run: COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python pytest -m comfyui tests/comfyui
"""
from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from comfy_server import COMFYUI_DIR, COMFYUI_PYTHON, ROOT, TINY_LOADER, make_base, server_args, start_server

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no ComfyUI source tree)")]

OUR_NODES = ("InfiniteTalkLoadTwoAudios", "InfiniteTalkMaskFromRegion", "InfiniteTalkModelLoader",
             "InfiniteTalkMultiSampler", "InfiniteTalkVideoCombine")
LEFT_S, RIGHT_S = 0.48, 0.32  # 12 and 8 frames at 25 fps


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory, custom_node_package):
    gen = start_server(tiny_models, tmp_path_factory.mktemp("comfyui_base"))
    srv = next(gen)
    _write_inputs(srv.base / "input")
    yield srv
    next(gen, None)


def _write_inputs(folder: Path) -> None:
    import importlib

    media = importlib.import_module("infinitetalk_multi_pkg.nodes.media")
    from infinitetalk.audio.io import write_wav

    rng = np.random.default_rng(0)
    picture = (rng.random((64, 96, 3)) * 255).astype(np.uint8)
    media.write_png(picture, folder / "infinitetalk_two_people.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[8:56, 4:92] = 255
    media.write_png(mask, folder / "infinitetalk_mask.png")
    for name, seconds, freq in (("infinitetalk_left.wav", LEFT_S, 180.0), ("infinitetalk_right.wav", RIGHT_S, 290.0)):
        t = np.arange(int(seconds * 16000)) / 16000
        write_wav(folder / name, (0.3 * np.sin(2 * np.pi * freq * t))[None].astype(np.float32), 16000)
    media.frames_to_mp4(np.repeat(picture[None], 10, axis=0), folder / "infinitetalk_two_people.mp4")


def _graph(name: str, seed: int) -> dict:
    graph = json.loads((ROOT / "workflows" / "api" / f"{name}_api.json").read_text())
    for node in graph.values():
        if node["class_type"] == "InfiniteTalkModelLoader":
            node["inputs"].update(TINY_LOADER)
        if node["class_type"] == "InfiniteTalkMultiSampler":
            node["inputs"].update(preset="quality", steps=2, size_scale=0.05, seed=seed)
    return graph


def _saved_video(server, entry: dict) -> Path:
    for output in entry["outputs"].values():
        for item in output.get("images", []):
            if item["filename"].endswith(".mp4"):
                return server.base / "output" / item["subfolder"] / item["filename"]
    raise AssertionError(f"no mp4 in the outputs: {entry['outputs']}")


def _probe(path: Path) -> tuple[int, float, float | None]:
    with av.open(str(path)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0] if c.streams.audio else None
        return frames, float(v.duration * v.time_base), None if a is None else float(a.duration * a.time_base)


def _errors(entry: dict) -> list[dict]:
    return [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]


# -- tests ---------------------------------------------------------------------------------------------
def test_quick_test_for_ci_imports_the_package(tiny_models, tmp_path):
    base = make_base(tmp_path / "base")
    done = subprocess.run([COMFYUI_PYTHON, *server_args(base, tiny_models), "--quick-test-for-ci"], cwd=COMFYUI_DIR,
                          capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "infinitetalk_multi" in log and "IMPORT FAILED" not in log, log[-3000:]


def test_object_info_lists_every_node_with_tooltips(server):
    info = server.get("/object_info")
    for name in OUR_NODES:
        node = info[name]
        assert node["category"] == "InfiniteTalk" and node["description"], name
        assert "InfiniteTalk" in node["search_aliases"], name  # found by searching "InfiniteTalk"
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{inp}"
        assert len(node["output_tooltips"]) == len(node["output"]), name
    assert info["InfiniteTalkVideoCombine"]["output_node"] is True
    loader = info["InfiniteTalkModelLoader"]["input"]["required"]
    assert TINY_LOADER["infinitetalk_patch"] in loader["infinitetalk_patch"][0]
    assert "chinese-wav2vec2-base/model.safetensors" in loader["audio_encoder"][0]  # wav2vec2/ registered
    assert "infinitetalk_left.wav" in info["InfiniteTalkLoadTwoAudios"]["input"]["required"]["left_audio"][0]
    assert info["InfiniteTalkLoadTwoAudios"]["display_name"] == "Load Two Audios (left / right speaker)"
    assert not [k for k in info if k in ("LoadTwoAudios", "MaskFromRegion")]  # no unprefixed ids of ours
    # guidance named for what it is, the preset's numbers as defaults and the presets' table for the web extension
    sampler = info["InfiniteTalkMultiSampler"]["input"]["required"]
    assert "text_scale" not in sampler and "audio_scale" not in sampler
    preset = sampler["preset"][1]
    fast = preset["presets"][preset["default"]]
    for name in ("steps", "text_guidance", "audio_guidance"):
        assert sampler[name][1]["default"] == fast[name] and sampler[name][1]["tooltip"], name
    assert preset["presets"]["quality"] == {"steps": 40, "text_guidance": 5.0, "audio_guidance": 4.0}
    optional = info["InfiniteTalkModelLoader"]["input"]["optional"]
    assert {"vram_gb", "attention", "fp8_matmul", "compile", "gpus"} <= set(optional)
    # every node of the shipped API graphs exists here and each literal/linked input is declared
    for name in ("infinitetalk_multi_image", "infinitetalk_multi_video"):
        for node in _graph(name, 0).values():
            declared = info[node["class_type"]]["input"]
            names = {**declared.get("required", {}), **declared.get("optional", {})}
            assert set(node["inputs"]) <= set(names), (node["class_type"], set(node["inputs"]) - set(names))
    assert any(path.endswith("/infinitetalk.js") for path in server.get("/extensions"))


def test_image_workflow_over_http(server):
    entry = server.run(_graph("infinitetalk_multi_image", seed=5))
    assert entry["status"]["status_str"] == "success", [e.get("exception_message") for e in _errors(entry)]
    frames, video_s, audio_s = _probe(_saved_video(server, entry))
    assert frames == round((LEFT_S + RIGHT_S) * 25)  # left_right: one after the other
    assert video_s == pytest.approx(frames / 25, abs=0.01) and audio_s == pytest.approx(frames / 25, abs=0.05)
    mask = next(k for k, n in _graph("infinitetalk_multi_image", 0).items()
                if n["class_type"] == "InfiniteTalkMaskFromRegion")
    assert entry["outputs"].get(mask, {}).get("images")  # the mask node shows its own preview


def test_video_workflow_over_http_without_mask(server):
    graph = _graph("infinitetalk_multi_video", seed=6)
    mask_node = next(k for k, n in graph.items() if n["_meta"]["title"] == "mask_image")
    del graph[mask_node]  # what the hosted API does when mask_image is not given
    for node in graph.values():
        node["inputs"] = {k: v for k, v in node["inputs"].items() if not (isinstance(v, list) and v[0] == mask_node)}
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", [e.get("exception_message") for e in _errors(entry)]
    frames, video_s, audio_s = _probe(_saved_video(server, entry))
    assert frames == round(max(LEFT_S, RIGHT_S) * 25)  # meanwhile: both at once
    assert audio_s == pytest.approx(frames / 25, abs=0.05)


def test_bad_inputs_name_the_input_and_the_server_keeps_serving(server):
    graph = _graph("infinitetalk_multi_image", seed=7)
    assert not [n for n in graph.values() if n["class_type"] == "PreviewImage"]  # else that part runs and "succeeds"
    audio_node = next(k for k, n in graph.items() if n["class_type"] == "InfiniteTalkLoadTwoAudios")
    bad = copy.deepcopy(graph)
    bad[audio_node]["inputs"]["right_audio"] = "missing.wav"
    status, body = server.post("/prompt", {"prompt": bad, "client_id": "t"})
    assert status == 400
    details = json.dumps(body["node_errors"][audio_node])
    assert "right_audio" in details and "missing.wav" in details

    bad = copy.deepcopy(graph)
    mask_node = next(k for k, n in graph.items() if n["class_type"] == "InfiniteTalkMaskFromRegion")
    bad[mask_node]["inputs"].update(mode="boxes", left_region="1,2")
    entry = server.run(bad)
    errors = _errors(entry)
    assert entry["status"]["status_str"] == "error" and errors
    assert errors[0]["node_type"] == "InfiniteTalkMaskFromRegion" and "left_region" in errors[0]["exception_message"]

    bad = copy.deepcopy(graph)  # 'frames' connected but over its limit: an error saying what to raise
    sampler = next(k for k, n in graph.items() if n["class_type"] == "InfiniteTalkMultiSampler")
    bad[sampler]["inputs"]["frames_limit_mb"] = 0
    bad["99"] = {"class_type": "PreviewImage", "inputs": {"images": [sampler, 1]}, "_meta": {"title": "frames"}}
    entry = server.run(bad)
    errors = _errors(entry)
    assert errors and errors[0]["node_type"] == "InfiniteTalkMultiSampler", entry["status"]
    assert "raise frames_limit_mb to" in errors[0]["exception_message"]

    bad = copy.deepcopy(graph)
    loader = next(k for k, n in graph.items() if n["class_type"] == "InfiniteTalkModelLoader")
    bad[loader]["inputs"]["vae"] = "clip_vision_h.safetensors"
    status, body = server.post("/prompt", {"prompt": bad, "client_id": "t"})
    assert status == 400 and "vae" in json.dumps(body["node_errors"][loader])

    bad = copy.deepcopy(graph)   # two missing files: one error each, on its own input, naming that file; nothing runs
    bad[loader]["inputs"].update(diffusion_model="gone_dit.safetensors", text_encoder="gone_t5.safetensors")
    status, body = server.post("/prompt", {"prompt": bad, "client_id": "t"})
    assert status == 400, body
    errors = body["node_errors"][loader]["errors"]
    assert sorted(e["extra_info"]["input_name"] for e in errors) == ["diffusion_model", "text_encoder"]
    for error in errors:
        wanted = "gone_dit" if error["extra_info"]["input_name"] == "diffusion_model" else "gone_t5"
        assert wanted in error["details"], error
    assert server.get("/system_stats")["system"]["comfyui_version"]


def test_cancel_interrupts_the_job_and_the_server_keeps_serving(server):
    import time

    graph = _graph("infinitetalk_multi_image", seed=8)
    for node in graph.values():   # a long job (100 steps, larger frames), so the interrupt lands inside it
        if node["class_type"] == "InfiniteTalkMultiSampler":
            node["inputs"].update(steps=100, size_scale=0.1)
    status, body = server.post("/prompt", {"prompt": graph, "client_id": "t"})
    assert status == 200
    prompt_id = body["prompt_id"]
    deadline = time.time() + 120
    while not server.get("/queue")["queue_running"] and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # inside the job (model loading / first steps)
    assert server.post("/interrupt", {})[0] == 200
    while time.time() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and (entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
            break
        time.sleep(0.5)
    interrupted = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"]
    assert interrupted, entry["status"]["messages"]
    assert interrupted[0]["node_type"] == "InfiniteTalkMultiSampler"  # stopped inside the job, between steps
    assert server.get("/system_stats")["system"]["comfyui_version"]


def test_the_sampler_says_stage_window_step_and_ends_on_the_seed_used(server):
    """ComfyUI's progress text of the sampler node, as the frontend receives it over the websocket: stage,
    window x/y and step while it runs, the seed used at the end (seed -1: a new one each run)."""
    import asyncio
    import struct

    import aiohttp

    graph = _graph("infinitetalk_multi_image", seed=-1)
    sampler = next(k for k, n in graph.items() if n["class_type"] == "InfiniteTalkMultiSampler")

    async def texts() -> list[str]:
        seen: list[str] = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws?clientId=progress-text") as ws:
                status, body = await asyncio.to_thread(server.post, "/prompt",
                                                       {"prompt": graph, "client_id": "progress-text"})
                assert status == 200, body
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", msg.data[:4])[0] == 3:
                        size = struct.unpack(">I", msg.data[4:8])[0]
                        if msg.data[8:8 + size].decode() == sampler:
                            seen.append(msg.data[8 + size:].decode())
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        if data["type"] in ("execution_success", "execution_error") and \
                                data["data"].get("prompt_id") == body["prompt_id"]:
                            return seen
        return seen

    first, second = asyncio.run(asyncio.wait_for(texts(), 600)), asyncio.run(asyncio.wait_for(texts(), 600))
    assert any(t.startswith("window 1/1 · step 1/2 · sampling") for t in first), first
    assert first[-1].startswith("Done: 20 frames") and " seed " in first[-1], first
    assert second and second[-1].startswith("Done:") and second[-1] != first[-1]   # -1 drew another seed
