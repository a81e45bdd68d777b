"""The two UI workflows loaded in the real ComfyUI frontend (headless Chromium), as a user opens them.

Skipped unless COMFYUI_DIR is set AND a chromium binary is found (or CHROMIUM names one). Checks: every
node type is known to the frontend (a bogus type in the same graph is caught by the same check), each
widget holds the value the file gives it, the prompt the frontend queues equals the API twin, the
saved graph keeps its widgets_values, and nothing from our web/*.js lands in the console.

`python tests/comfyui/test_workflows_frontend.py --thumbnails` rewrites example_workflows/*.jpg
(template-browser thumbnails: a screenshot of the loaded graph, JPEG via PyAV).
"""
from __future__ import annotations

import asyncio
import copy
import importlib
import importlib.util
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
from browser import Browser, Page, chromium_binary  # noqa: E402
from comfy_server import COMFYUI_DIR, ROOT, start_server  # noqa: E402

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no ComfyUI source tree)"),
              pytest.mark.skipif(chromium_binary() is None, reason="no chromium binary (set CHROMIUM)")]

NAMES = ("infinitetalk_multi_image", "infinitetalk_multi_video")
READY = "!!(window.app && app.graph && app.canvas && window.LiteGraph)"
UNKNOWN_TYPES = "app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)"
WIDGETS = "Object.fromEntries(app.graph._nodes.map(n => [n.id, (n.widgets || []).map(w => [w.name, w.value])]))"
LINKS = ("[...(app.graph.links instanceof Map ? app.graph.links.values() : Object.values(app.graph.links))]"
         ".map(l => [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot, l.type])")
OURS = "/extensions/infinitetalk_multi/"


def _ui(name: str) -> dict:
    return json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())


def _api(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{name}_api.json").read_text())


# a returning user: no first-run template browser; the thumbnails also drop the minimap and canvas info
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}


async def _open(browser: Browser, server) -> Page:
    status, _ = server.post("/settings", SETTINGS)
    assert status == 200
    page = await browser.open(server.url)
    await page.wait_for(READY, 90)
    return page


async def _load(page, graph: dict) -> None:
    await page.evaluate(f"app.loadGraphData({json.dumps(graph)})")
    await page.wait_for(f"app.graph._nodes.length === {len(graph['nodes'])}", 20)


async def _check_all(server) -> dict:
    """Everything the test asserts on, gathered in one browser session."""
    seen: dict = {}
    async with Browser() as browser:
        page = await _open(browser, server)
        for name in NAMES:
            ui = _ui(name)
            await _load(page, ui)
            muted = [n["id"] for n in ui["nodes"] if n["mode"] == 2]
            seen[name] = {
                "unknown": await page.evaluate(UNKNOWN_TYPES),
                "widgets": await page.evaluate(WIDGETS),
                "links": await page.evaluate(LINKS),
                "prompt": await page.evaluate("app.graphToPrompt().then(p => p.output)"),
                "saved": await page.evaluate("app.graph.serialize()"),
            }
            for node_id in muted:  # what the user gets after un-muting mask_image
                await page.evaluate(f"app.graph.getNodeById({node_id}).mode = 0")
            seen[name]["prompt_unmuted"] = await page.evaluate("app.graphToPrompt().then(p => p.output)")
        bogus = copy.deepcopy(_ui(NAMES[0]))
        bogus["nodes"][1]["type"] = "NoSuchInfiniteTalkNode"
        await _load(page, bogus)
        seen["bogus_unknown"] = await page.evaluate(UNKNOWN_TYPES)
        seen["console"] = page.console
    return seen


@pytest.fixture(scope="module")
def frontend(tiny_models, tmp_path_factory, custom_node_package):
    gen = start_server(tiny_models, tmp_path_factory.mktemp("comfyui_frontend"))
    server = next(gen)
    try:
        seen = asyncio.run(_check_all(server))
        seen["templates"] = server.get("/api/workflow_templates")
        seen["thumbnails"] = {}
        for name in NAMES:
            with urllib.request.urlopen(f"{server.url}/api/workflow_templates/infinitetalk_multi/{name}.jpg") as r:
                seen["thumbnails"][name] = (r.headers.get("Content-Type"), r.read())
        yield seen
    finally:
        next(gen, None)


def test_missing_node_types_are_detected_and_there_are_none(frontend):
    assert frontend["bogus_unknown"] == ["NoSuchInfiniteTalkNode"]
    for name in NAMES:
        assert frontend[name]["unknown"] == [], name


@pytest.mark.parametrize("name", NAMES)
def test_widgets_and_links_land_where_the_file_puts_them(frontend, name):
    ui, seen = _ui(name), frontend[name]
    audios = next(n["id"] for n in ui["nodes"] if n["type"] == "LoadTwoAudios")
    names = [w for w, _ in seen["widgets"][str(audios)]]
    assert names[-2:] == ["upload_left_audio", "upload_right_audio"], "web/upload_two_audios.js did not run"
    for node in ui["nodes"]:
        values = [v for w, v in seen["widgets"][str(node["id"])] if not w.startswith("upload_")]
        assert values == node["widgets_values"], f"{node['type']} {node['title']}"
    assert sorted(seen["links"]) == sorted([[i, str(s), ss, str(d), ds, t] for i, s, ss, d, ds, t in ui["links"]])
    saved = {n["id"]: n for n in seen["saved"]["nodes"]}
    for node in ui["nodes"]:  # saving the graph again keeps every widget value (upload buttons are not saved)
        assert saved[node["id"]].get("widgets_values", []) == node["widgets_values"], node["type"]


@pytest.mark.parametrize("name", NAMES)
def test_queued_prompt_is_the_api_twin(frontend, name):
    api = _api(name)
    assert frontend[name]["prompt_unmuted"] == api
    # muted mask_image: the node and its link into the sampler are left out, nothing else changes
    mask = next(k for k, v in api.items() if v["_meta"]["title"] == "mask_image")
    without = {k: copy.deepcopy(v) for k, v in api.items() if k != mask}
    for node in without.values():
        node["inputs"] = {k: v for k, v in node["inputs"].items() if not (isinstance(v, list) and v[0] == mask)}
    assert frontend[name]["prompt"] == without


def test_template_browser_serves_the_thumbnails(frontend):
    for name in NAMES:
        kind, data = frontend["thumbnails"][name]
        assert kind == "image/jpeg" and data[:2] == b"\xff\xd8" and len(data) <= 100_000, name


def test_template_browser_lists_only_the_ui_workflows(frontend):
    # ComfyUI lists <pack>/workflows/*.json as templates too: the API twins live one level down (workflows/api/).
    assert sorted(frontend["templates"]["infinitetalk_multi"]) == sorted(NAMES)


def test_no_console_errors_from_our_extension(frontend):
    ours = [e for e in frontend["console"] if OURS in e["url"] or OURS in e["text"] or e["level"] == "exception"]
    assert ours == []


# -- thumbnails -------------------------------------------------------------------------------------
def _placeholder_models(root: Path) -> Path:
    """Empty files with the names the workflows' loader selects (the combos list names only)."""
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    for file_name, _, folder in builder.MODEL_FILES.values():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / file_name).write_bytes(b"")
    return root


def _placeholder_inputs(folder: Path) -> None:
    import numpy as np

    from infinitetalk.audio.io import write_wav

    spec = importlib.util.spec_from_file_location("infinitetalk_multi_pkg", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    sys.modules[spec.name] = package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)
    media = importlib.import_module("infinitetalk_multi_pkg.nodes.media")
    write_png, frames_to_mp4 = media.write_png, media.frames_to_mp4

    y, x = np.mgrid[0:270, 0:480]
    picture = np.stack([x * 255 // 480, y * 255 // 270, np.full_like(x, 140)], -1).astype(np.uint8)
    write_png(picture, folder / "infinitetalk_two_people.png")
    write_png(np.where((x > 40) & (x < 440), 255, 0).astype(np.uint8), folder / "infinitetalk_mask.png")
    frames_to_mp4(np.repeat(picture[None], 5, axis=0), folder / "infinitetalk_two_people.mp4")
    for name in ("infinitetalk_left.wav", "infinitetalk_right.wav"):
        write_wav(folder / name, np.zeros((1, 16000), np.float32), 16000)


def _png_to_jpeg(png: Path, jpeg: Path, box: tuple[int, int] = (800, 450)) -> None:
    """Scaled to fit `box` (aspect kept, even sides), JPEG through PyAV's mjpeg encoder."""
    import av

    with av.open(str(png)) as source:
        frame = next(source.decode(video=0))
        fit = min(box[0] / frame.width, box[1] / frame.height)
        width, height = 2 * int(frame.width * fit / 2), 2 * int(frame.height * fit / 2)
        frame = frame.reformat(width=width, height=height, format="yuvj420p", interpolation="AREA")
    with av.open(str(jpeg), "w", format="image2") as out:
        stream = out.add_stream("mjpeg")
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        stream.options = {"q:v": "4"}
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


BOUNDS = """(() => { const ns = app.graph._nodes, top = LiteGraph.NODE_TITLE_HEIGHT + 20;
  return [Math.min(...ns.map(n => n.pos[0])), Math.min(...ns.map(n => n.pos[1] - top)),
          Math.max(...ns.map(n => n.pos[0] + n.size[0])), Math.max(...ns.map(n => n.pos[1] + n.size[1]))] })()"""


async def _screenshots(server, folder: Path, width: int = 1600, height: int = 900, pad: int = 12) -> None:
    """Each graph zoomed to fill the page (UI panels hidden), clipped to the nodes."""
    async with Browser(width, height) as browser:
        page = await _open(browser, server)
        await page.evaluate("app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
        for name in NAMES:
            await _load(page, _ui(name))
            x0, y0, x1, y1 = await page.evaluate(BOUNDS)
            scale = min((width - 2 * pad) / (x1 - x0), (height - 80) / (y1 - y0))  # 80: the canvas toolbar
            await page.evaluate(f"app.canvas.ds.scale = {scale}; app.canvas.ds.offset = [{pad / scale - x0}, "
                                f"{pad / scale - y0}]; app.canvas.setDirty(true, true)")
            await asyncio.sleep(2)  # image previews, DOM widgets follow the view
            clip = {"x": 0, "y": 0, "width": (x1 - x0) * scale + 2 * pad, "height": (y1 - y0) * scale + 2 * pad,
                    "scale": 1}
            await page.screenshot(folder / f"{name}.png", clip)


def make_thumbnails() -> None:
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        gen = start_server(_placeholder_models(Path(tmp) / "models"), Path(tmp) / "base")
        server = next(gen)
        try:
            _placeholder_inputs(server.base / "input")
            asyncio.run(_screenshots(server, Path(tmp)))
        finally:
            next(gen, None)
        for name in NAMES:
            _png_to_jpeg(Path(tmp) / f"{name}.png", ROOT / "example_workflows" / f"{name}.jpg")
            print(f"example_workflows/{name}.jpg")


if __name__ == "__main__" and "--thumbnails" in sys.argv:
    make_thumbnails()
