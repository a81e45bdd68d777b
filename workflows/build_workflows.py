"""Writes the shipped workflows from one description each: UI format (example_workflows/) + API format (workflows/).

Run `python workflows/build_workflows.py` after changing a node's inputs; tests/test_workflows.py checks
the files are what this script writes and that each UI graph and its API twin agree. `--thumbnails` also
rewrites the template-browser thumbnails (example_workflows/*.jpg, see `thumbnail`).

Hosted-API parameters (image/video, left_audio, right_audio, mask_image, prompt, order, resolution,
seed) are found in the API graphs by the convention of `infinitetalk/service/graph.py`: the node titled
P (`_meta.title`) with an input P or a single literal input, else the node with a literal input named P.
`workflows/api/parameters.json` spells the resulting mapping out.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.1.0"
CORE_VERSION = "0.33.0"
# Core node types used, with their widget names in UI order and their socket outputs.
CORE_NODES = {
    "LoadImage": {"widgets": ["image", "upload"], "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")], "inputs": []},
    "LoadVideo": {"widgets": ["file", "upload"], "outputs": [("VIDEO", "VIDEO")], "inputs": []},
    "PreviewImage": {"widgets": [], "outputs": [("images", "IMAGE")], "inputs": [("images", "IMAGE")]},
}
NOTE_TYPES = ("Note", "MarkdownNote")  # frontend-only nodes, never in API graphs
MUTED = 2  # LiteGraph mode "never": the node and its links are left out of the prompt (Ctrl+M toggles it);
# bypass (4) would make the frontend look for a pass-through input a loader does not have, and warn.
# Node size per type [w, h] (at least what frontend 1.49 computes, so it keeps them) and the view a graph opens with.
SIZES = {"LoadImage": [300, 330], "LoadVideo": [300, 330], "InfiniteTalkLoadTwoAudios": [520, 330],
         "InfiniteTalkModelLoader": [520, 430], "InfiniteTalkMaskFromRegion": [320, 520], "PreviewImage": [320, 300],
         "InfiniteTalkMultiSampler": [380, 550], "InfiniteTalkVideoCombine": [340, 450]}
NOTE_SIZE = [760, 170]
VIEW = (1400, 820, 90, 100)  # fit the graph into this many screen pixels, top-left margin (sidebar, menu bar)
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def import_package():
    """The repository imported as a ComfyUI custom-node package (relative imports intact), once."""
    name = "infinitetalk_multi_pkg"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def node_schema(class_type: str) -> dict:
    """widgets (UI order, seed's control value noted), socket inputs and outputs of a node type."""
    if class_type in CORE_NODES:
        spec = CORE_NODES[class_type]
        return {"widgets": [(w, False) for w in spec["widgets"]], "inputs": spec["inputs"], "outputs": spec["outputs"]}
    cls = import_package().NODE_CLASS_MAPPINGS[class_type]
    types = cls.INPUT_TYPES()
    widgets, inputs = [], []
    for section in ("required", "optional"):
        for name, (kind, *rest) in types.get(section, {}).items():
            opts = rest[0] if rest else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                widgets.append((name, bool(opts.get("control_after_generate"))))
            else:
                inputs.append((name, kind))
    outputs = list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES))
    return {"widgets": widgets, "inputs": inputs, "outputs": outputs}


# -- the two graphs --------------------------------------------------------------------------------
SAMPLER_COMMON = {
    "prompt": "Two people are talking to each other in a bright room, natural head and hand movements.",
    "negative_prompt": "", "resolution": "480p", "seed": 42, "preset": "fast", "steps": 6,
    "text_guidance": 1.0, "audio_guidance": 2.0, "color_strength": 1.0, "size_scale": 1.0, "frames_limit_mb": 2048,
    "shift": 0.0, "denoise": 1.0, "teacache": 0.0,
}
def model_files() -> dict[str, tuple[str, str, str]]:
    """role -> (file the loader widget names, download url, folder): the loader's own DOWNLOADS and ROLES."""
    loader = import_package().nodes.model_nodes
    return {role: (url.rsplit("/", 1)[1], url, loader.ROLES[role][0][0]) for role, url in loader.DOWNLOADS.items()}


LOADER = {role: spec[0] for role, spec in model_files().items()} | {
    "lora_strength": 1.0, "precision": "auto", "offload": "auto",
    "vram_gb": 0.0, "attention": "sdpa", "fp8_matmul": "off", "compile": False, "gpus": 1, "dit_kind": "auto"}
SAVE = {"fps": 25.0, "codec": "h264", "crf": 19, "pix_fmt": "yuv420p", "trim_to_audio": True, "embed_workflow": True}


def image_graph() -> dict:
    return {
        "name": "infinitetalk_multi_image",
        # the template browser shows and searches a custom node's template only by its file name (its title,
        # description and name in frontend 1.49; no tags): so the name carries the words people search for
        "title": "InfiniteTalk Multi - picture to two-person talking video, lip sync",
        "note": ("InfiniteTalk Multi, picture -> two-person talking video.\n"
                 "1. Load the picture of the two people and their two voices (left person = left_audio).\n"
                 "2. Check the mask preview: red = left voice, blue = right voice.\n"
                 "3. order: left_right = left speaks first, then right; meanwhile = both tracks at once.\n"
                 "4. preset fast needs the lightx2v LoRA; quality (40 steps) needs none; turbo (4 steps, one model\n"
                 "   call each, ~3x faster than fast) runs the 4-step distilled DiT (diffusion_model\n"
                 "   InfiniteTalk-4StepDistill-Mean-w-ITAudioAdaptorV6.1-bf16, lora none) or this base DiT + the\n"
                 "   lightx2v LoRA. Choosing a preset fills steps, text_guidance and audio_guidance with its\n"
                 "   numbers (edit them after to override).\n"
                 "The video is as long as the audio, any length; it is streamed to disk window by window.\n"
                 "mask_image (muted, grey): select it and press Ctrl+M to limit motion to the white parts of a "
                 "mask picture."),
        "nodes": [
            (1, "LoadImage", "image", {"image": "infinitetalk_two_people.png", "upload": "image"}, {}),
            (2, "InfiniteTalkLoadTwoAudios", "Left and right audio",
             {"left_audio": "infinitetalk_left.wav", "right_audio": "infinitetalk_right.wav"}, {}),
            (3, "InfiniteTalkModelLoader", "Models", dict(LOADER), {}),
            (4, "InfiniteTalkMaskFromRegion", "Who speaks where",
             {"mode": "halves", "margin": 0.05, "left_region": "5,45", "right_region": "55,95"}, {"image": (1, 0)}),
            (6, "LoadImage", "mask_image", {"image": "infinitetalk_mask.png", "upload": "image"}, {}),
            (7, "InfiniteTalkMultiSampler", "Generate", dict(SAMPLER_COMMON, order="left_right"),
             {"models": (3, 0), "left_audio": (2, 0), "right_audio": (2, 1), "image": (1, 0), "left_mask": (4, 0),
              "right_mask": (4, 1), "mask_image": (6, 0)}),
            (8, "InfiniteTalkVideoCombine", "Save video", dict(SAVE, filename_prefix="InfiniteTalk/multi_image"),
             {"video": (7, 0)}),
        ],
        "muted": [6],
        # columns left to right: inputs | audio + models | speaker masks | sampler | output
        "layout": {1: (0, 230), 6: (0, 720), 2: (330, 230), 3: (330, 760), 4: (890, 230),
                   7: (1250, 230), 8: (1670, 230)},
    }


def video_graph() -> dict:
    return {
        "name": "infinitetalk_multi_video",
        "title": "InfiniteTalk Multi - video to two-person lip sync dub",
        "note": ("InfiniteTalk Multi, video -> the same two people lip-synced to new voices.\n"
                 "1. Load the video of the two people and their two voices (left person = left_audio).\n"
                 "2. order meanwhile = both tracks at once (dubbing); left_right / right_left = one after the other.\n"
                 "3. Speakers are bound to the left and right halves of the frame; connect InfiniteTalk Mask From "
                 "Region masks to left_mask/right_mask for other layouts.\n"
                 "4. preset fast needs the lightx2v LoRA; quality (40 steps) needs none; turbo (4 steps, one model\n"
                 "   call each, ~3x faster than fast) runs the 4-step distilled DiT (diffusion_model\n"
                 "   InfiniteTalk-4StepDistill-Mean-w-ITAudioAdaptorV6.1-bf16, lora none) or this base DiT + the\n"
                 "   lightx2v LoRA. Choosing a preset fills steps, text_guidance and audio_guidance with its\n"
                 "   numbers (edit them after to override).\n"
                 "The source video is read window by window (never whole into RAM).\n"
                 "mask_image (muted, grey): select it and press Ctrl+M to limit motion to the white parts of a "
                 "mask picture."),
        "nodes": [
            (1, "LoadVideo", "video", {"file": "infinitetalk_two_people.mp4", "upload": "image"}, {}),
            (2, "InfiniteTalkLoadTwoAudios", "Left and right audio",
             {"left_audio": "infinitetalk_left.wav", "right_audio": "infinitetalk_right.wav"}, {}),
            (3, "InfiniteTalkModelLoader", "Models", dict(LOADER), {}),
            (6, "LoadImage", "mask_image", {"image": "infinitetalk_mask.png", "upload": "image"}, {}),
            (7, "InfiniteTalkMultiSampler", "Generate", dict(SAMPLER_COMMON, order="meanwhile"),
             {"models": (3, 0), "left_audio": (2, 0), "right_audio": (2, 1), "video": (1, 0), "mask_image": (6, 0)}),
            (8, "InfiniteTalkVideoCombine", "Save video", dict(SAVE, filename_prefix="InfiniteTalk/multi_video"),
             {"video": (7, 0)}),
        ],
        "muted": [6],
        "layout": {1: (0, 230), 6: (0, 720), 2: (330, 230), 3: (330, 760), 7: (890, 230), 8: (1310, 230)},
    }


# -- writers ---------------------------------------------------------------------------------------
def to_api(graph: dict) -> dict:
    api = {}
    for node_id, class_type, title, values, links in graph["nodes"]:
        schema = node_schema(class_type)
        inputs = {name: values[name] for name, _ in schema["widgets"] if name in values and name != "upload"}
        inputs.update({name: [str(src), slot] for name, (src, slot) in links.items()})
        api[str(node_id)] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
    return api


def to_ui(graph: dict) -> dict:
    links, link_id = [], 0
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    schemas = {nid: node_schema(ct) for nid, ct, *_ in graph["nodes"]}
    for node_id, _, _, _, node_links in graph["nodes"]:
        for name, (src, slot) in node_links.items():
            link_id += 1
            to_slot = [n for n, _ in schemas[node_id]["inputs"]].index(name)
            links.append([link_id, src, slot, node_id, to_slot, schemas[src]["outputs"][slot][1]])
            out_links.setdefault((src, slot), []).append(link_id)
            in_links[(node_id, name)] = link_id
    nodes = []
    for order, (node_id, class_type, title, values, _) in enumerate(graph["nodes"]):  # listed sources first
        schema = schemas[node_id]
        widgets_values = []
        for name, control in schema["widgets"]:
            widgets_values.append(values[name])
            if control:
                widgets_values.append("randomize")  # as core templates: a new seed each run
        ours = class_type not in CORE_NODES
        properties = {"Node name for S&R": class_type, "cnr_id": "infinitetalk-multi" if ours else "comfy-core",
                      "ver": VERSION if ours else CORE_VERSION}
        if class_type == "InfiniteTalkModelLoader":
            properties["models"] = [{"name": n, "url": u, "directory": d} for n, u, d in model_files().values()]
        nodes.append({
            "id": node_id, "type": class_type, "title": title,
            "pos": list(graph["layout"][node_id]), "size": list(SIZES[class_type]),
            "flags": {}, "order": order, "mode": MUTED if node_id in graph.get("muted", ()) else 0,
            "inputs": [{"name": n, "type": t, "link": in_links.get((node_id, n))} for n, t in schema["inputs"]],
            "outputs": [{"name": n, "type": t, "links": out_links.get((node_id, i), []), "slot_index": i}
                        for i, (n, t) in enumerate(schema["outputs"])],
            "properties": properties, "widgets_values": widgets_values,
        })
    note_id = max(n["id"] for n in nodes) + 1
    nodes.append({"id": note_id, "type": "Note", "title": "Read me", "pos": [0, 0], "size": list(NOTE_SIZE),
                  "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                  "properties": {}, "widgets_values": [graph["note"]], "color": "#432", "bgcolor": "#653"})
    return {"id": f"infinitetalk-{graph['name']}", "revision": 0, "last_node_id": note_id, "last_link_id": link_id,
            "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": view(nodes)}, "version": 0.4}


def view(nodes: list[dict]) -> dict:
    """The canvas scale and offset that show every node (LiteGraph: screen = (pos + offset) * scale)."""
    width, height, left, top = VIEW
    x0, y0 = min(n["pos"][0] for n in nodes), min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    scale = min(1.0, int(20 * min(width / (x1 - x0), height / (y1 - y0))) / 20)
    return {"scale": scale, "offset": [round(left / scale - x0), round(top / scale - y0)]}


def parameter_map(api: dict) -> dict:
    """parameter -> {node, class_type, input} by the service convention (see module docstring)."""
    wanted = ("image", "video", "left_audio", "right_audio", "mask_image", "prompt", "order", "resolution", "seed")
    out = {}
    for param in wanted:
        for node_id, node in api.items():
            literals = [k for k, v in node["inputs"].items() if not isinstance(v, list)]
            title = node["_meta"]["title"]
            if title == param and (param in literals or len(literals) == 1):
                out[param] = {"node": node_id, "class_type": node["class_type"],
                              "input": param if param in literals else literals[0]}
        if param not in out:
            for node_id, node in api.items():
                if node["_meta"]["title"] in wanted:  # that node belongs to its own parameter
                    continue
                if param in node["inputs"] and not isinstance(node["inputs"][param], list):
                    out[param] = {"node": node_id, "class_type": node["class_type"], "input": param}
                    break
        if param == "mask_image" and param in out:
            out[param]["optional"] = True
    return out


def build() -> dict[Path, str]:
    files: dict[Path, str] = {}
    params = {}
    for graph in (image_graph(), video_graph()):
        api = to_api(graph)
        files[ROOT / "example_workflows" / f"{graph['title']}.json"] = json.dumps(to_ui(graph), indent=2) + "\n"
        files[ROOT / "workflows" / "api" / f"{graph['name']}_api.json"] = json.dumps(api, indent=2) + "\n"
        params[f"{graph['name']}_api.json"] = parameter_map(api)
    files[ROOT / "workflows" / "api" / "parameters.json"] = json.dumps(params, indent=2) + "\n"
    return files


def thumbnail(video: bool, width: int = 480, height: int = 320) -> "np.ndarray":
    """uint8 [H,W,3]: what InfiniteTalk Mask From Region shows for the drawn two-person demo picture (halves
    mode: red = left voice, blue = right voice, dimmed = background), i.e. a real output frame of the image
    template; the video template's adds film-strip bands. Model output is not used: tiny models give noise."""
    import numpy as np
    import torch

    from infinitetalk.demo import two_faces_image
    from infinitetalk.pipeline.masks import default_speaker_masks

    overlay = import_package().nodes.mask_nodes.overlay_preview
    picture = torch.from_numpy(two_faces_image(height, width)).float().div(255)[None]
    frame = overlay(picture, default_speaker_masks(height, width, face_scale=0.05).float())[0]
    out = (frame.numpy() * 255).round().astype(np.uint8)
    if video:
        band = height // 12
        for rows in (slice(0, band), slice(height - band, height)):
            out[rows] = 20
            for x in range(band // 2, width, band * 2):  # sprocket holes
                out[rows.start + band // 4: rows.start + 3 * band // 4, x:x + band] = 235
    return out


def write_jpeg(image, path: Path) -> None:
    """JPEG through PyAV's mjpeg encoder (no imaging library needed)."""
    import av

    height, width = image.shape[:2]
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuvj420p")
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("mjpeg")
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        stream.options = {"q:v": "4"}
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


if __name__ == "__main__":
    for path, text in build().items():
        path.write_text(text)
        print(path.relative_to(ROOT))
    if "--thumbnails" in sys.argv:
        for graph in (image_graph(), video_graph()):
            path = ROOT / "example_workflows" / f"{graph['title']}.jpg"
            write_jpeg(thumbnail(video=graph["name"].endswith("video")), path)
            print(path.relative_to(ROOT))
