"""The one door from the nodes to ComfyUI's services (folders, progress, interruption, devices).

Every ComfyUI module is imported lazily, inside a function, so the nodes import (and run, in tests
or scripts) without ComfyUI: then folders come from `configure(...)` (or the current directory),
progress and previews are no-ops and interruption never happens.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Callable

# Model folders the loader reads; the ones ComfyUI may not know get registered under models/.
MODEL_FOLDERS = ("diffusion_models", "model_patches", "loras", "audio_encoders", "wav2vec2",
                 "text_encoders", "clip_vision", "vae")
EXTRA_FOLDERS = ("model_patches", "audio_encoders", "wav2vec2")
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt", ".gguf", ".json")

_standalone: dict[str, Path] = {}


def _comfy(name: str) -> Any | None:
    """The ComfyUI module `name`, or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def in_comfyui() -> bool:
    return _comfy("folder_paths") is not None


def configure(models_dir: str | Path | None = None, input_dir: str | Path | None = None,
              output_dir: str | Path | None = None, temp_dir: str | Path | None = None) -> None:
    """Folders used outside ComfyUI (tests, scripts); ignored inside ComfyUI."""
    for key, value in (("models", models_dir), ("input", input_dir), ("output", output_dir), ("temp", temp_dir)):
        if value is not None:
            _standalone[key] = Path(value)


def _standalone_dir(kind: str) -> Path:
    return _standalone.get(kind, Path.cwd() / kind)


# -- folders -----------------------------------------------------------------------------------------
def register_model_folders() -> None:
    """Add the model folders ComfyUI lacks (wav2vec2 etc.) under its models dir; idempotent."""
    fp = _comfy("folder_paths")
    if fp is None:
        return
    for name in EXTRA_FOLDERS:
        if name not in fp.folder_names_and_paths:
            fp.add_model_folder_path(name, os.path.join(fp.models_dir, name), is_default=True)


def list_models(folder: str) -> list[str]:
    """Weight files in a model folder (relative names, subfolders included), sorted."""
    fp = _comfy("folder_paths")
    if fp is not None:
        register_model_folders()
        names = fp.get_filename_list(folder)
    else:
        root = _standalone_dir("models") / folder
        names = [str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    return sorted(n for n in names if n.lower().endswith(WEIGHT_SUFFIXES) and not n.lower().endswith(
        ("config.json", "tokenizer.json", "vocab.json", "preprocessor_config.json", "special_tokens_map.json",
         "tokenizer_config.json")))


def model_path(folder: str, name: str) -> Path | None:
    """Full path of `name` in a model folder, None when absent."""
    fp = _comfy("folder_paths")
    if fp is not None:
        register_model_folders()
        full = fp.get_full_path(folder, name)
        return Path(full) if full else None
    full = _standalone_dir("models") / folder / name
    return full if full.is_file() else None


def metadata_disabled() -> bool:
    """ComfyUI's --disable-metadata: saved files carry no graph (core's savers honour it too)."""
    cli = _comfy("comfy.cli_args")
    return bool(getattr(getattr(cli, "args", None), "disable_metadata", False))


def input_dir() -> Path:
    fp = _comfy("folder_paths")
    return Path(fp.get_input_directory()) if fp is not None else _standalone_dir("input")


def output_dir() -> Path:
    fp = _comfy("folder_paths")
    return Path(fp.get_output_directory()) if fp is not None else _standalone_dir("output")


def temp_dir() -> Path:
    fp = _comfy("folder_paths")
    path = Path(fp.get_temp_directory()) if fp is not None else _standalone_dir("temp")
    path.mkdir(parents=True, exist_ok=True)
    return path


ENV_JOBS_DIR = "INFINITETALK_JOBS_DIR"


def jobs_dir() -> Path:
    """Where per-job resume folders live: `INFINITETALK_JOBS_DIR` (shared storage in a fleet, so another
    server resumes a job from its last finished window), else `<temp>/infinitetalk/jobs`."""
    raw = os.environ.get(ENV_JOBS_DIR, "").strip()
    if not raw:
        return temp_dir() / "infinitetalk" / "jobs"
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise RuntimeError(f"{ENV_JOBS_DIR}={raw!r}: expected an absolute folder path (shared by the servers)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def input_files(content_types: tuple[str, ...]) -> list[str]:
    """Files in the input folder of the given kinds ("audio", "video", "image"), sorted."""
    root = input_dir()
    if not root.is_dir():
        return []
    files = [f for f in os.listdir(root) if (root / f).is_file()]
    fp = _comfy("folder_paths")
    if fp is not None and hasattr(fp, "filter_files_content_types"):
        return sorted(fp.filter_files_content_types(files, list(content_types)))
    suffixes = {"audio": (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus"),
                "video": (".mp4", ".webm", ".mov", ".mkv", ".avi"),
                "image": (".png", ".jpg", ".jpeg", ".webp")}
    wanted = tuple(s for kind in content_types for s in suffixes.get(kind, ()))
    return sorted(f for f in files if f.lower().endswith(wanted))


def input_path(name: str) -> Path:
    """A file chosen in an upload combo ("name", "sub/name" or "name [input]") as a full path."""
    fp = _comfy("folder_paths")
    if fp is not None:
        return Path(fp.get_annotated_filepath(name))
    return input_dir() / name


def input_exists(name: str) -> bool:
    fp = _comfy("folder_paths")
    if fp is not None:
        return bool(fp.exists_annotated_filepath(name))
    return (input_dir() / name).is_file()


def save_path(prefix: str, width: int = 0, height: int = 0) -> tuple[Path, str, str]:
    """Next free output file stem for `prefix` with ComfyUI's counter: (folder, file stem, subfolder)."""
    out = output_dir()
    fp = _comfy("folder_paths")
    if fp is not None:
        folder, filename, counter, subfolder, _ = fp.get_save_image_path(prefix, str(out), width, height)
    else:
        subfolder = os.path.dirname(os.path.normpath(prefix))
        filename = os.path.basename(os.path.normpath(prefix))
        folder = str(out / subfolder)
        os.makedirs(folder, exist_ok=True)
        taken = [int(n[len(filename) + 1:].split("_")[0]) for n in os.listdir(folder)
                 if n.startswith(filename + "_") and n[len(filename) + 1:].split("_")[0].isdigit()]
        counter = max(taken, default=0) + 1
    os.makedirs(folder, exist_ok=True)
    return Path(folder), f"{filename}_{counter:05}_", subfolder


# -- progress, previews, interruption --------------------------------------------------------------
class Progress:
    """One ComfyUI progress bar (no-op outside ComfyUI); `preview` takes uint8 [H,W,3] frames."""

    def __init__(self, total: int):
        utils = _comfy("comfy.utils")
        self._bar = utils.ProgressBar(max(1, int(total))) if utils is not None else None
        self.total = max(1, int(total))
        self.value = 0
        self._preview = None

    def update(self, value: int, total: int | None = None) -> None:
        self.value, self.total = int(value), int(total or self.total)
        if self._bar is not None:
            self._bar.update_absolute(self.value, self.total, self._preview)
            self._preview = None

    def preview(self, frame: Any) -> None:
        """Show one finished frame (numpy uint8 [H,W,3]) as the node's preview image."""
        if self._bar is None:
            return
        try:
            from PIL import Image  # ComfyUI ships Pillow
        except ImportError:
            return
        self._preview = ("JPEG", Image.fromarray(frame), 512)
        self.update(self.value, self.total)


def progress_text(text: str) -> None:
    """A status line shown on the running node (ComfyUI's progress text); ignored outside ComfyUI."""
    if not in_comfyui():
        return
    server, context = _comfy("server"), _comfy("comfy_execution.utils")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    running = getattr(context, "get_executing_context", lambda: None)()
    if instance is None or running is None or not hasattr(instance, "send_progress_text"):
        return
    instance.send_progress_text(text, running.node_id)


def interrupted() -> bool:
    """True once the user pressed Cancel in ComfyUI (the pipeline's cancel hook)."""
    mm = _comfy("comfy.model_management")
    return bool(mm is not None and mm.processing_interrupted())


def raise_if_interrupted() -> None:
    """Raise ComfyUI's own interrupt exception so the UI reports 'interrupted', not an error."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


# -- devices and memory ----------------------------------------------------------------------------
def torch_device() -> Any:
    import torch

    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_room_for(entry: Any | None) -> None:
    """Before loading or running our models: with `entry` (nodes/core_memory.CoreEntry) ComfyUI frees only what
    our models need and lists them among its own, so a later workflow's models can free ours in turn; without
    one (weights not loaded yet, size unknown to core) its models are unloaded."""
    mm = _comfy("comfy.model_management")
    if mm is None:
        return
    if entry is None:
        mm.unload_all_models()
    else:
        mm.load_models_gpu([entry])
    mm.soft_empty_cache()


def soft_empty_cache() -> None:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()


def guarded(fn: Callable[[], Any]) -> Any:
    """Run `fn`, turning a pipeline cancel into ComfyUI's interrupt when the user cancelled."""
    from infinitetalk.errors import JobCancelled

    try:
        return fn()
    except JobCancelled:
        raise_if_interrupted()
        raise


def blocked_output(message: str) -> Any:
    """An output value that stops any node reading it with `message` (ComfyUI's ExecutionBlocker)."""
    graph_utils = _comfy("comfy_execution.graph_utils")
    return graph_utils.ExecutionBlocker(message) if graph_utils is not None else None  # outside: no reader


def core_video(path: Path) -> Any:
    """A core VIDEO (lazy, file-backed) for `path` inside ComfyUI; the path itself elsewhere."""
    api = _comfy("comfy_api.latest")
    if api is not None and hasattr(api, "InputImpl"):
        return api.InputImpl.VideoFromFile(str(path))
    return str(path)


def register_job_api() -> bool:
    """Serve the hosted job API (/infinitetalk/v1/...) from the running ComfyUI server, if any."""
    if not in_comfyui():
        return False
    import logging

    try:
        from infinitetalk.service.app import register_with_comfyui

        return register_with_comfyui()
    except Exception:  # noqa: BLE001 - the nodes must load even if the API cannot start
        logging.getLogger("infinitetalk").exception("InfiniteTalk job API could not be registered")
        return False
