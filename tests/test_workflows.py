"""The shipped workflows: each UI graph (example_workflows/) and its API twin (workflows/) agree, use only
known node types, carry valid widget values, download hints and the hosted-API parameter names."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("infinitetalk_multi_image", ("image",)), ("infinitetalk_multi_video", ("video",))]
# API name -> UI template file name (the template browser shows a custom template's file name as its title)
TITLES = {"infinitetalk_multi_image": "InfiniteTalk Multi - picture to two-person talking video, lip sync",
          "infinitetalk_multi_video": "InfiniteTalk Multi - video to two-person lip sync dub"}
HOSTED = ("left_audio", "right_audio", "mask_image", "prompt", "order", "resolution", "seed")
# ComfyUI core node types the workflows use, with their widgets in UI order (checked against a real
# ComfyUI's /object_info by tests/comfyui when COMFYUI_DIR is set).
CORE_WIDGETS = {"LoadImage": ["image", "upload"], "LoadVideo": ["file", "upload"], "PreviewImage": []}
FRONTEND_ONLY = ("Note", "MarkdownNote")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _widgets(pkg, class_type: str) -> list[tuple[str, dict | None, object]]:
    """(name, options, type) of each widget in UI order; the seed control value is its own entry."""
    if class_type in CORE_WIDGETS:
        return [(w, None, None) for w in CORE_WIDGETS[class_type]]
    types = pkg.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, (kind, *rest) in types.get(section, {}).items():
            opts = rest[0] if rest else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                out.append((name, opts, kind))
                if opts.get("control_after_generate"):
                    out.append(("control_after_generate", None, None))
    return out


def _ui_as_api(pkg, ui: dict) -> dict:
    """The API graph a UI graph stands for (what the frontend's export does), independent of the builder."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        inputs = {}
        for (name, _, _), value in zip(_widgets(pkg, node["type"]), node["widgets_values"]):
            if name not in ("upload", "control_after_generate"):
                inputs[name] = value
        for slot in node["inputs"]:
            if slot["link"] is not None:
                _, src, src_slot, dst, _, _ = links[slot["link"]]
                assert dst == node["id"]
                inputs[slot["name"]] = [str(src), src_slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title")}}
    return api


@pytest.mark.parametrize("name,_", PAIRS)
def test_ui_graph_and_api_twin_agree(custom_node_package, name, _):
    ui = _load(ROOT / "example_workflows" / f"{TITLES[name]}.json")
    api = _load(ROOT / "workflows" / "api" / f"{name}_api.json")
    assert _ui_as_api(custom_node_package, ui) == api
    assert {n["type"] for n in ui["nodes"]} & set(FRONTEND_ONLY), "the UI graph has a Note"
    # links are consistent in the UI format itself (ids, output lists, slot types)
    by_id = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        wanted = by_id[dst]["inputs"][dst_slot]["type"].split(",")
        assert kind == by_id[src]["outputs"][src_slot]["type"] and kind in wanted
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    assert ui["last_node_id"] == max(by_id)


@pytest.mark.parametrize("name,_", PAIRS)
def test_every_node_type_exists_and_widget_values_are_valid(custom_node_package, name, _):
    ours = custom_node_package.NODE_CLASS_MAPPINGS
    api = _load(ROOT / "workflows" / "api" / f"{name}_api.json")
    for node_id, node in api.items():
        kind = node["class_type"]
        assert kind in ours or kind in CORE_WIDGETS, f"{node_id}: unknown node type {kind}"
        if kind not in ours:
            continue
        types = ours[kind].INPUT_TYPES()
        declared = {**types["required"], **types.get("optional", {})}
        assert set(types["required"]) <= set(node["inputs"]), f"{kind}: required inputs missing"
        for inp, value in node["inputs"].items():
            spec, opts = declared[inp][0], declared[inp][1]
            if isinstance(value, list):
                continue
            if isinstance(spec, list) and inp not in ("left_audio", "right_audio") and kind != "InfiniteTalkModelLoader":
                assert value in spec, f"{kind}.{inp}={value!r}"
            if spec in ("INT", "FLOAT"):
                assert opts.get("min", value) <= value <= opts.get("max", value), f"{kind}.{inp}"


@pytest.mark.parametrize("name,_", PAIRS)
def test_model_download_hints(name, _):
    ui = _load(ROOT / "example_workflows" / f"{TITLES[name]}.json")
    loader = next(n for n in ui["nodes"] if n["type"] == "InfiniteTalkModelLoader")
    hints = {m["name"]: m for m in loader["properties"]["models"]}
    files = [v for v in loader["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
    assert len(files) == 7 and set(files) == set(hints)
    folders = {"diffusion_models", "model_patches", "loras", "audio_encoders", "text_encoders", "clip_vision", "vae"}
    assert {m["directory"] for m in hints.values()} == folders
    for m in hints.values():
        assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith("/" + m["name"])


@pytest.mark.parametrize("name,inputs", PAIRS)
def test_hosted_parameters_are_machine_readable(name, inputs):
    api = _load(ROOT / "workflows" / "api" / f"{name}_api.json")
    mapping = _load(ROOT / "workflows" / "api" / "parameters.json")[f"{name}_api.json"]
    assert set(mapping) == set(inputs) | set(HOSTED)
    for param, where in mapping.items():
        node = api[where["node"]]
        assert node["class_type"] == where["class_type"] and where["input"] in node["inputs"]
        assert not isinstance(node["inputs"][where["input"]], list), f"{param} must be a literal input"
    for param in (*inputs, "mask_image"):  # file parameters: a node titled with the parameter name
        assert api[mapping[param]["node"]]["_meta"]["title"] == param
    assert mapping["mask_image"].get("optional") is True
    # the mask node is muted in the UI graph (optional; mode 2 = never), active in the API twin (removed when unused)
    ui = _load(ROOT / "example_workflows" / f"{TITLES[name]}.json")
    assert next(n for n in ui["nodes"] if n.get("title") == "mask_image")["mode"] == 2


@pytest.mark.parametrize("name,inputs", PAIRS)
def test_service_convention_finds_the_same_slots(name, inputs):
    """The hosted-API code fills graphs by its own rule; it must land on the documented slots."""
    try:
        from infinitetalk.service.graph import parameter_slots
    except ImportError:
        pytest.skip("infinitetalk.service.graph is not available")
    api = _load(ROOT / "workflows" / "api" / f"{name}_api.json")
    slots = parameter_slots(api)
    for param, where in _load(ROOT / "workflows" / "api" / "parameters.json")[f"{name}_api.json"].items():
        assert slots[param] == (where["node"], where["input"]), param


def test_checked_in_files_are_what_the_builder_writes(custom_node_package):
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    for path, text in builder.build().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run python workflows/build_workflows.py"


@pytest.mark.parametrize("name,_", PAIRS)
def test_nodes_do_not_overlap_on_the_canvas(name, _):
    """Each node's box (title bar included, 30 px) is clear of every other, so the graph opens readable."""
    boxes = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1], n["title"])
             for n in _load(ROOT / "example_workflows" / f"{TITLES[name]}.json")["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"{a[4]} overlaps {b[4]}"


def test_templates_are_titled_and_have_a_thumbnail_each():
    shipped = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))
    assert shipped == sorted(TITLES.values())
    for title in TITLES.values():
        thumb = ROOT / "example_workflows" / f"{title}.jpg"
        assert thumb.read_bytes()[:2] == b"\xff\xd8", f"{thumb.name} is not a JPEG"


def test_node_ids_carry_the_package_prefix(custom_node_package):
    for node_id in custom_node_package.NODE_CLASS_MAPPINGS:
        assert node_id.startswith("InfiniteTalk"), node_id
    for name, _ in PAIRS:
        api = _load(ROOT / "workflows" / "api" / f"{name}_api.json")
        ours = [n["class_type"] for n in api.values() if n["class_type"] not in CORE_WIDGETS]
        assert ours and all(t.startswith("InfiniteTalk") for t in ours), ours


@pytest.mark.parametrize("name,_", PAIRS)
def test_sampler_guidance_widgets_hold_the_presets_numbers(name, _):
    from infinitetalk.pipeline.request import PRESETS

    api = _load(ROOT / "workflows" / "api" / f"{name}_api.json")
    sampler = next(n["inputs"] for n in api.values() if n["class_type"] == "InfiniteTalkMultiSampler")
    preset = PRESETS[sampler["preset"]]
    assert (sampler["steps"], sampler["text_guidance"], sampler["audio_guidance"]) == (
        preset.steps, preset.text_guidance, preset.audio_guidance)


def test_audio_encoder_link_is_the_public_copy():
    ui = _load(ROOT / "example_workflows" / f"{TITLES['infinitetalk_multi_image']}.json")
    loader = next(n for n in ui["nodes"] if n["type"] == "InfiniteTalkModelLoader")
    wav2vec2 = next(m for m in loader["properties"]["models"] if m["directory"] == "audio_encoders")
    assert wav2vec2["url"] == ("https://huggingface.co/Kijai/wav2vec2_safetensors/resolve/main/"
                               "wav2vec2-chinese-base_fp16.safetensors")


@pytest.mark.parametrize("name,_", PAIRS)
def test_seed_control_randomizes_as_core_templates(custom_node_package, name, _):
    """A new seed every run, as core's templates; the sampler shows the seed it used on its node."""
    ui = _load(ROOT / "example_workflows" / f"{TITLES[name]}.json")
    sampler = next(n for n in ui["nodes"] if n["type"] == "InfiniteTalkMultiSampler")
    names = [w for w, _, _ in _widgets(custom_node_package, sampler["type"])]
    assert sampler["widgets_values"][names.index("control_after_generate")] == "randomize"


def test_template_names_carry_the_words_people_search_for():
    """The template browser searches a pack's templates by file name only (title = description = name):
    "InfiniteTalk", "lip sync" and what each makes must be in it."""
    for name, title in TITLES.items():
        assert (ROOT / "example_workflows" / f"{title}.json").is_file() and (ROOT / "example_workflows" / f"{title}.jpg").is_file()
        words = set(title.lower().replace(",", " ").split())
        assert {"infinitetalk", "lip", "sync", "two-person"} <= words, title
        assert ("picture" if name.endswith("image") else "video") in words
