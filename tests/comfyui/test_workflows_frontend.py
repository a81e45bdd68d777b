"""The two UI workflows loaded in the real ComfyUI frontend (headless Chromium), as a user opens them.

Skipped unless COMFYUI_DIR is set AND a chromium binary is found (or CHROMIUM names one). Checks: every
node type is known to the frontend (a bogus type in the same graph is caught by the same check), each
widget holds the value the file gives it, the prompt the frontend queues equals the API twin, the
saved graph keeps its widgets_values, nothing from our web/*.js lands in the console, the template
browser lists both under "InfiniteTalk Multi" and its search finds them, choosing a sampler preset fills its
numbers, the audio node's upload buttons clear the frontend's "missing media" state, a missing model file is
one error on its own input with where it goes and its download link, and with Nodes 2.0 (the Vue renderer)
the audio players show and no two nodes of a template overlap.
Thumbnails: `python workflows/build_workflows.py --thumbnails`.
"""
from __future__ import annotations

import asyncio
import copy
import json
import urllib.parse
import urllib.request

import pytest

pytest.importorskip("aiohttp")
from browser import Browser, Page, chromium_binary  # noqa: E402
from comfy_server import COMFYUI_DIR, ROOT, TINY_LOADER, start_server  # noqa: E402

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no ComfyUI source tree)"),
              pytest.mark.skipif(chromium_binary() is None, reason="no chromium binary (set CHROMIUM)")]

NAMES = ("infinitetalk_multi_image", "infinitetalk_multi_video")  # API twins; the UI files carry titles
TITLES = {"infinitetalk_multi_image": "InfiniteTalk Multi - picture to two-person talking video, lip sync",
          "infinitetalk_multi_video": "InfiniteTalk Multi - video to two-person lip sync dub"}
PINIA = "document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s"
# the template browser's side bar entries for custom-node packs: [id, label]
TEMPLATE_NAV = (f"(async () => {{ const s = {PINIA}.get('workflowTemplates'); await s.loadWorkflowTemplates();"
                " return s.navGroupedTemplates.flatMap(g => g.items || []).filter(i => i.id?.startsWith('extension-'))"
                ".map(i => [i.id, i.label]) })()")
# a new sampler from the node library, then the user picks 'quality', then edits steps
PRESET_FILL = """(() => { const n = LiteGraph.createNode('InfiniteTalkMultiSampler'); app.graph.add(n);
  const w = name => n.widgets.find(x => x.name === name), read = () => ['steps', 'text_guidance', 'audio_guidance']
    .map(k => w(k).value);
  const before = read(); w('preset').value = 'quality'; w('preset').callback('quality'); const quality = read();
  w('steps').value = 12; const edited = read(); app.graph.remove(n); return [before, quality, edited] })()"""
LOADER_WIDTH = "LiteGraph.createNode('InfiniteTalkModelLoader').size[0]"
PLAYERS = ("app.graph._nodes.filter(n => n.type === 'InfiniteTalkLoadTwoAudios')"
           ".flatMap(n => n.widgets.filter(w => w.name.endsWith('_player')).map(w => w.element.src))")
READY = "!!(window.app && app.graph && app.canvas && window.LiteGraph)"
STORES = "[...document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s.values()]"
MISSING_MEDIA = (f"({STORES}.find(s => 'missingMediaCandidates' in s).missingMediaCandidates || [])"
                 ".map(c => [String(c.nodeId), c.widgetName])")
# the audio node's own upload buttons, as a user picks a file: the hidden file inputs get a file and fire
UPLOAD = """(async () => { const pickers = [...document.querySelectorAll('input[type=file][accept="audio/*,video/*"]')];
  for (const [i, picker] of pickers.slice(-2).entries()) { const t = new DataTransfer();
    t.items.add(new File([new Uint8Array(64)], `uploaded_${i ? 'right' : 'left'}.wav`, {type: 'audio/wav'}));
    picker.files = t.files; await picker.onchange(); }
  const n = app.graph._nodes.find(n => n.type === 'InfiniteTalkLoadTwoAudios');
  return ['left_audio', 'right_audio'].map(k => n.widgets.find(w => w.name === k).value) })()"""
# a queued graph whose loader names a file that is not there: the error ComfyUI answers, as the frontend gets it
QUEUE_MISSING = """(async g => { const r = await window.comfyAPI.api.api.fetchApi('/prompt', {method: 'POST',
  headers: {'Content-Type': 'application/json'}, body: JSON.stringify({prompt: g})}); return await r.json() })"""
# the template browser as a user searches it: open it, type into its search box, read the cards found
TEMPLATE_SEARCH = """(async q => { if (!document.querySelector('[data-testid^=template-workflow-]'))
    await app.extensionManager.command.execute('Comfy.BrowseTemplates');
  await new Promise(r => setTimeout(r, 1500));
  const box = [...document.querySelectorAll('input')].find(i => /search/i.test(i.placeholder || ''));
  box.value = q; box.dispatchEvent(new Event('input', {bubbles: true}));
  await new Promise(r => setTimeout(r, 1500));
  return [...document.querySelectorAll('[data-testid^=template-workflow-]')]
    .map(e => e.getAttribute('data-testid').slice('template-workflow-'.length)) })"""
# Nodes 2.0: the DOM boxes of the nodes (canvas-independent) and the audio players the Vue renderer shows
NODE_BOXES = ("[...document.querySelectorAll('[data-node-id]')].map(e => { const r = e.getBoundingClientRect();"
              " return [e.getAttribute('data-node-id'), r.left, r.top, r.right, r.bottom] })")
VUE_PLAYERS = ("[...document.querySelectorAll('[data-node-id] audio')].map(a => a.getAttribute('src') || '')")
UNKNOWN_TYPES = "app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)"
WIDGETS = "Object.fromEntries(app.graph._nodes.map(n => [n.id, (n.widgets || []).map(w => [w.name, w.value])]))"
LINKS = ("[...(app.graph.links instanceof Map ? app.graph.links.values() : Object.values(app.graph.links))]"
         ".map(l => [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot, l.type])")
OURS = "/extensions/infinitetalk_multi/"


def _ui(name: str) -> dict:
    return json.loads((ROOT / "example_workflows" / f"{TITLES[name]}.json").read_text())


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
                "players": await page.evaluate(PLAYERS),
            }
            for node_id in muted:  # what the user gets after un-muting mask_image
                await page.evaluate(f"app.graph.getNodeById({node_id}).mode = 0")
            seen[name]["prompt_unmuted"] = await page.evaluate("app.graphToPrompt().then(p => p.output)")
        bogus = copy.deepcopy(_ui(NAMES[0]))
        bogus["nodes"][1]["type"] = "NoSuchInfiniteTalkNode"
        await _load(page, bogus)
        seen["bogus_unknown"] = await page.evaluate(UNKNOWN_TYPES)
        seen["preset_fill"] = await page.evaluate(PRESET_FILL)
        seen["loader_width"] = await page.evaluate(LOADER_WIDTH)
        seen["template_nav"] = await page.evaluate(TEMPLATE_NAV)
        absent = copy.deepcopy(_ui(NAMES[0]))   # audio files that are not in the input folder: "missing media"
        audios = next(n for n in absent["nodes"] if n["type"] == "InfiniteTalkLoadTwoAudios")
        audios["widgets_values"] = ["absent_left.wav", "absent_right.wav"]
        await _load(page, absent)
        await page.wait_for(f"{MISSING_MEDIA}.length >= 2", 30)
        seen["missing_before_upload"] = await page.evaluate(MISSING_MEDIA)
        seen["uploaded"] = await page.evaluate(UPLOAD)
        seen["missing_after_upload"] = await page.evaluate(MISSING_MEDIA)
        seen["players_after_upload"] = await page.evaluate(PLAYERS)
        graph = _api(NAMES[0])
        loader = next(n for n in graph.values() if n["class_type"] == "InfiniteTalkModelLoader")
        loader["inputs"].update(TINY_LOADER, vae="absent_vae.safetensors")
        seen["missing_model"] = await page.evaluate(f"{QUEUE_MISSING}({json.dumps(graph)})")
        seen["search"] = {q: await page.evaluate(f"{TEMPLATE_SEARCH}({json.dumps(q)})")
                          for q in ("InfiniteTalk", "lip sync", "two-person talking")}
        seen["console"] = page.console
    return seen


async def _check_nodes_2(server) -> dict:
    """The templates with the Vue node renderer (Nodes 2.0) switched on."""
    seen: dict = {}
    status, _ = server.post("/settings", {"Comfy.VueNodes.Enabled": True})
    assert status == 200
    try:
        async with Browser() as browser:
            page = await _open(browser, server)
            for name in NAMES:
                await _load(page, _ui(name))
                await page.wait_for(f"document.querySelectorAll('[data-node-id]').length >= {len(_ui(name)['nodes'])}", 30)
                await asyncio.sleep(1.0)   # the Vue nodes settle their size
                seen[name] = {"boxes": await page.evaluate(NODE_BOXES), "players": await page.evaluate(VUE_PLAYERS)}
            seen["console"] = page.console
    finally:
        server.post("/settings", {"Comfy.VueNodes.Enabled": False})
    return seen


@pytest.fixture(scope="module")
def frontend(tiny_models, tmp_path_factory, custom_node_package):
    gen = start_server(tiny_models, tmp_path_factory.mktemp("comfyui_frontend"))
    server = next(gen)
    try:
        seen = asyncio.run(_check_all(server))
        seen["nodes_2"] = asyncio.run(_check_nodes_2(server))
        seen["templates"] = server.get("/api/workflow_templates")
        seen["thumbnails"] = {}
        for name in NAMES:
            file = urllib.parse.quote(f"{TITLES[name]}.jpg")
            with urllib.request.urlopen(f"{server.url}/api/workflow_templates/infinitetalk_multi/{file}") as r:
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
    audios = next(n["id"] for n in ui["nodes"] if n["type"] == "InfiniteTalkLoadTwoAudios")
    names = [w for w, _ in seen["widgets"][str(audios)]]
    extra = ["upload_left_audio", "left_audio_player", "upload_right_audio", "right_audio_player"]
    assert names[-4:] == extra, "web/infinitetalk.js did not run"
    widgets = dict(seen["widgets"][str(audios)])  # each player plays the file its side's combo names
    assert len(seen["players"]) == 2
    for src, side in zip(seen["players"], ("left_audio", "right_audio")):
        assert "/view?" in src and f"filename={widgets[side]}" in src and "type=input" in src, src
    for node in ui["nodes"]:
        values = [v for w, v in seen["widgets"][str(node["id"])] if w not in extra]
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
    assert sorted(frontend["templates"]["infinitetalk_multi"]) == sorted(TITLES.values())


def test_template_browser_files_them_under_the_pack_name(frontend):
    assert ["extension-infinitetalk_multi", "InfiniteTalk Multi"] in frontend["template_nav"]


def test_preset_fills_its_numbers_and_an_edit_wins(frontend):
    before, quality, edited = frontend["preset_fill"]
    assert before == [6, 1.0, 2.0] and quality == [40, 5.0, 4.0] and edited == [12, 5.0, 4.0]


def test_model_loader_is_wide_enough_to_read(frontend):
    assert frontend["loader_width"] >= 520


def test_no_console_errors_from_our_extension(frontend):
    ours = [e for e in frontend["console"] if OURS in e["url"] or OURS in e["text"] or e["level"] == "exception"]
    assert ours == []


def test_upload_buttons_set_the_combo_and_clear_missing_media(frontend):
    """The node's own upload buttons do what core's audio upload does: no false "Missing Inputs" remains."""
    audios = next(str(n["id"]) for n in _ui(NAMES[0])["nodes"] if n["type"] == "InfiniteTalkLoadTwoAudios")
    assert sorted(w for n, w in frontend["missing_before_upload"] if n == audios) == ["left_audio", "right_audio"]
    left, right = frontend["uploaded"]
    assert left.startswith("uploaded_left") and right.startswith("uploaded_right")
    assert [w for n, w in frontend["missing_after_upload"] if n == audios] == []
    assert all(f"filename={v}" in src for v, src in zip(frontend["uploaded"], frontend["players_after_upload"]))


def test_a_missing_model_file_is_one_error_on_its_input_with_where_and_download(frontend):
    from infinitetalk_multi_pkg.nodes.model_nodes import DOWNLOADS

    loader = next(k for k, n in _api(NAMES[0]).items() if n["class_type"] == "InfiniteTalkModelLoader")
    errors = frontend["missing_model"]["node_errors"][loader]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["vae"], errors
    assert "absent_vae.safetensors" in errors[0]["details"] and "models/vae" in errors[0]["details"]
    assert DOWNLOADS["vae"] in errors[0]["details"]   # added by web/infinitetalk.js to core's "Value not in list"


@pytest.mark.parametrize("name", NAMES)
def test_nodes_2_shows_the_audio_players_and_no_node_overlaps(frontend, name):
    seen = frontend["nodes_2"][name]
    widgets = dict(dict(frontend[name]["widgets"])[str(next(n["id"] for n in _ui(name)["nodes"]
                                                            if n["type"] == "InfiniteTalkLoadTwoAudios"))])
    assert len(seen["players"]) == 2, seen["players"]
    for src, side in zip(seen["players"], ("left_audio", "right_audio")):
        assert f"filename={widgets[side]}" in src, src
    boxes = seen["boxes"]
    overlaps = [(a, b) for i, (a, *ra) in enumerate(boxes) for b, *rb in boxes[i + 1:]
                if not (ra[2] <= rb[0] or rb[2] <= ra[0] or ra[3] <= rb[1] or rb[3] <= ra[1])]
    assert overlaps == [], boxes


def test_template_browser_search_finds_both_templates(frontend):
    for query, found in frontend["search"].items():
        wanted = set(TITLES.values()) if query != "two-person talking" else {TITLES[NAMES[0]]}
        assert wanted <= set(found), (query, found)
